"""Engine integrations, one file per engine: ``fsdp.py`` (FSDP1, FSDP2), ``deepspeed.py`` (ZeRO),
``tensor.py`` (DTensor tensor parallel), ``ddp.py``, ``megatron.py`` (the engine part of the
Megatron-core layers), ``dtensor.py`` (tensors held as DTensors, by FSDP2 and tensor parallel).
``access.py`` is the one registry through which anything outside these files reads or writes a
full tensor; ``strategies.py`` is the table of recipe strategies. Map: docs/architecture.md.

Importing the package registers every engine's access handler (each file registers its own), so
``from dist_adapters.parallel.access import ...`` always sees all of them.
"""

# each registers its access handler; the one imported last is asked first
from . import dtensor  # noqa: F401, I001
from . import fsdp  # noqa: F401
from . import deepspeed  # noqa: F401
from . import megatron  # noqa: F401
from . import expert  # noqa: F401
