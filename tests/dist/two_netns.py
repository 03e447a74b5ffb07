"""Two "hosts" for a two-node launch: network namespaces joined by a veth pair, each running one
node of `dist-adapters launch`. Run it inside ``unshare --user --map-root-user --mount --net``:
there it is root of its own namespaces, so neither root nor the host's network is needed (the
/run it mounts and the namespaces it makes vanish with it).

    two_netns.py MASTER_PORT -- TRAIN ARGS...     (exit code: the first failing node's, else 0)
"""

import os
import subprocess
import sys

port, _, *train = sys.argv[1:]
NS, VETH, ADDR = ["dan0", "dan1"], ["dav0", "dav1"], ["10.77.0.1", "10.77.0.2"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


# `ip netns` keeps its namespaces under /run/netns: a private tmpfs in this mount namespace
subprocess.run(["mount", "-t", "tmpfs", "none", "/run"], check=True)
os.makedirs("/run/netns")
ip("link", "set", "lo", "up")
for ns in NS:
    ip("netns", "add", ns)
ip("link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1])
for i in (0, 1):
    ip("link", "set", VETH[i], "netns", NS[i])
    ip("-n", NS[i], "addr", "add", f"{ADDR[i]}/24", "dev", VETH[i])
    ip("-n", NS[i], "link", "set", VETH[i], "up")
    ip("-n", NS[i], "link", "set", "lo", "up")
nodes = [subprocess.Popen(["ip", "netns", "exec", NS[i], "env", f"GLOO_SOCKET_IFNAME={VETH[i]}", sys.executable, "-m",
                           "dist_adapters.cli", "launch", "--nnodes", "2", "--node-rank", str(i), "--master-addr",
                           ADDR[0], "--local-addr", ADDR[i], "--master-port", port, "--", *train])
         for i in (0, 1)]
codes = [node.wait(timeout=300) for node in nodes]
sys.exit(next((c for c in codes if c), 0))
