"""Optional bridges to other training frameworks.

Nothing here is imported by the rest of the package; each submodule needs its framework
installed and says how to install it when it is missing:

* :mod:`tiedlora.integrations.nemo` -- Tied-LoRA as a NeMo 2 PEFT transform
  (``pip install -e '.[nemo]' -c requirements-nemo.txt``; see docs/nemo.md);
* :mod:`tiedlora.integrations.nemo_merge` -- a NeMo 2 TiedLoRA adapter checkpoint folded into a
  full NeMo 2 checkpoint (``python -m tiedlora.integrations.nemo_merge``);
* :mod:`tiedlora.integrations.nemo_recipes` -- NeMo 2's fine-tuning recipes with TiedLoRA
  (needs ``nemo_run``).
"""
