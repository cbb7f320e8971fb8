"""tiedlora: Tied-LoRA adapters on megatron-core (Renduchintala et al., NAACL 2024).

    h = W x + s · v ⊙ B(u ⊙ A x)     A, B shared across layers; u, v per layer

Entry points (``python -m tiedlora.<command>``): ``finetune`` (training recipe),
``evaluate`` (evaluate a saved adapter), ``params`` (parameter report), ``merge`` (fold an
adapter into its base), ``export`` (Hugging Face PEFT LoRA), ``report`` (tables and
figures of finished runs), ``submit`` (Slurm), ``prepare_data`` (the paper's datasets),
``recipes`` (regenerate recipes/), ``mini_base`` (the embedded CPU base model).
The package's layers and owners: docs/architecture.md.
"""

import warnings as _warnings

__version__ = "0.1.0"

# megatron-core announces every torch fallback it takes when apex / transformer-engine are
# absent (always, on CPU). They are expected here; keep the console readable.
for _msg in ("Apex is not installed", "Transformer Engine and Apex are not installed",
             "full scope is deprecated", "`sequence_parallel` is set to `True`"):
    _warnings.filterwarnings("ignore", message=_msg + ".*")
