"""The one registry of engine access: how an engine holds a tensor, and how to read or write it
whole (rule 3 and rule 4 of docs/architecture.md).

Everything outside the engine files that needs a full tensor goes through the functions below:
merge and weight-dependent inits (``full_weights``), collective state dicts and loads
(``adapter_params``, ``read_full``, ``write_full``), shapes for injection (``full_shape``).
Each engine file defines one ``Access`` subclass for what its storage changes and registers it
with ``register``: ``dtensor.py`` (FSDP2 and DTensor tensor parallel), ``fsdp.py`` (FSDP1 flat
parameters), ``deepspeed.py`` (ZeRO partitions and fp32 masters), ``megatron.py`` (Megatron-core
TP shards). The package ``dist_adapters.parallel`` imports those files, so importing this
module (through the package) registers all of them. Nothing here names an engine.

Every rank must make the same calls in the same order: the engines' gathers are collectives.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch import nn

from ..control import unwrap
from ..names import clean_name


class Access:
    """How one engine holds tensors. The defaults are those of a plain module (full tensors)."""

    name = "plain"

    def claims_param(self, p: torch.Tensor) -> bool:
        """This engine holds ``p`` (decides read_full / write_full / full_shape / gathered_param)."""
        return False

    def claims_layer(self, layer: nn.Module, model: nn.Module) -> bool:
        """This engine holds ``layer``'s weights inside ``model`` (as the caller passed it)."""
        return False

    def claims_model(self, model: nn.Module) -> bool:
        """This engine iterates ``model``'s adapter parameters itself (``adapter_params``)."""
        return False

    def full_shape(self, p: torch.Tensor) -> torch.Size:
        return p.shape

    def read_full(self, p: torch.Tensor) -> torch.Tensor:
        """The whole tensor (inside ``gathered_param``)."""
        return p

    @torch.no_grad()
    def write_full(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """Write a whole value into ``p`` where the engine keeps it (inside ``gathered_param``)."""
        p.data.copy_(value.to(p.device, p.dtype))

    def gathered_param(self, p: torch.Tensor, writeback: bool) -> ContextManager:
        """Around reading / writing one parameter whole."""
        return nullcontext()

    def full_weights(self, layer: nn.Module, model: nn.Module) -> ContextManager:
        """Inside: ``layer``'s parameters are full ordinary tensors; in-place writes reach the
        engine's storage on exit."""
        return nullcontext()

    def adapter_params(self, model: nn.Module, wanted: Callable[[str], bool], writeback: bool
                       ) -> Iterator[tuple[str, nn.Parameter]]:
        """Only for engines that claim the model: their own collective iteration."""
        raise NotImplementedError

    def base_tensor_refusal(self, model: nn.Module) -> Optional[str]:
        """Why trainable tensors of the base (biases) cannot be saved or loaded under this engine
        ("ENGINE: reason; what to use instead"), or None when they can."""
        return None


PLAIN = Access()
_REGISTRY: list[Access] = []


def register(access: Access) -> Access:
    """Add an engine's access; the latest registered is asked first."""
    _REGISTRY.insert(0, access)
    return access


def for_param(p: torch.Tensor) -> Access:
    return next((a for a in _REGISTRY if a.claims_param(p)), PLAIN)


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape ``read_full(p)`` returns: the parameter's real shape whatever holds it."""
    return for_param(p).full_shape(p)


def read_full(p: torch.Tensor) -> torch.Tensor:
    """``p`` whole (collective for sharded engines; under ZeRO-3 only inside ``adapter_params``)."""
    return for_param(p).read_full(p)


def write_full(p: torch.Tensor, value: torch.Tensor) -> None:
    """Write the whole ``value`` into ``p``, also into the engine's master copy where it has one."""
    for_param(p).write_full(p, value)


def base_tensor_refusal(model: nn.Module) -> Optional[str]:
    """The first registered engine's reason why ``model``'s trainable base tensors (biases)
    cannot be saved or loaded, or None."""
    return next((r for r in (a.base_tensor_refusal(model) for a in _REGISTRY) if r), None)


@contextmanager
def full_weights(layer: nn.Module, model: Optional[nn.Module] = None) -> Iterator[nn.Module]:
    """``layer``'s weights full inside, written back on exit. ``model``: the model ``layer``
    belongs to, as the caller holds it (an engine wrapper or the plain module)."""
    model = layer if model is None else model
    access = next((a for a in _REGISTRY if a.claims_layer(layer, model)), PLAIN)
    with access.full_weights(layer, model):
        yield layer


def adapter_params(model: nn.Module, wanted: Callable[[str], bool], writeback: bool = False
                   ) -> Iterator[tuple[str, nn.Parameter]]:
    """(clean name, parameter) for every parameter whose clean name ``wanted`` accepts, in module
    order, each readable with ``read_full`` (and writable with ``write_full``; with ``writeback``
    the writes survive the engine's re-partitioning) while the caller holds it. Collective: every
    rank runs the same iteration; only the parameters asked for are gathered."""
    owner = next((a for a in _REGISTRY if a.claims_model(model)), None)
    if owner is not None:
        yield from owner.adapter_params(model, wanted, writeback)
        return
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        name = clean_name(name)
        if wanted(name):
            with for_param(p).gathered_param(p, writeback):
                yield name, p
