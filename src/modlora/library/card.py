"""The library card: the ``README.md`` a push writes beside a shared library, a Hub model card
(``library_name: modlora``, ``base_model``, tags) with a table of the experts and how to load the library with
modlora and each expert with PEFT.
"""

from __future__ import annotations

import re

from modlora.library.location import RemoteLocation
from modlora.library.store import ExpertLibrary
from modlora.models import EMBEDDED_NAME

CARD = "README.md"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_ID_OF_NAME = {EMBEDDED_NAME: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the GGUF the embedded model comes from


def hub_base_model(name: str) -> str | None:
    """The Hub id of a base model name, when there is one (an ``org/name`` id, or the embedded model's origin)."""
    if name in _HUB_ID_OF_NAME:
        return _HUB_ID_OF_NAME[name]
    return name if _HUB_ID_RE.match(name) else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def library_card(lib: ExpertLibrary, location: RemoteLocation) -> str:
    """The library's README.md: Hub metadata (``library_name: modlora``, ``base_model``, tags), the experts with
    their tasks, sizes and metrics, and how to load the library (modlora) and each expert (PEFT)."""
    from huggingface_hub import ModelCardData
    base = lib.base_model
    base_id = hub_base_model(base.name)
    data = ModelCardData(library_name="modlora", base_model=base_id,
                         tags=["modlora", "lora", "peft", "expert-library", "arrow-routing"])
    hub = location.hub
    title = hub.repo_id.split("/")[-1] if hub else location.url.rstrip("/").rsplit("/", 1)[-1]
    lines = ["---", data.to_yaml(), "---", "",
             f"# {title}: a modlora library of {len(lib)} LoRA experts", "",
             f"A library of LoRA experts built with [modlora](https://pypi.org/project/modlora/) for the base model "
             f"`{base.name}`" + (f" ([{base_id}](https://huggingface.co/{base_id}))" if base_id else "") + ".",
             "Route over it zero-shot with Arrow, merge it, or load any expert on its own as a PEFT adapter.", "",
             "| expert | tasks | rank | parameters | size | validation loss | steps |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in lib.expert_names():
        e = lib.entry(name)
        val = e.metrics.get("best_val_loss")
        size = sum((lib.expert_dir(name) / f).stat().st_size for f in e.files)
        lines.append(f"| {_cell(name)} | {_cell(', '.join(e.tasks) or '-')} | {e.lora.get('r', '-')} | "
                     f"{e.num_parameters:,} | {size / 1024:.0f} KiB | "
                     f"{f'{val:.4f}' if isinstance(val, float) else '-'} | {e.metrics.get('steps', '-')} |")
    url = location.url
    example = lib.expert_names()[0] if len(lib) else "EXPERT"
    prefix = f"{hub.path_in_repo}/" if hub and hub.path_in_repo else ""
    repo = hub.repo_id if hub else "my-library"
    rev = f", revision={hub.revision!r}" if hub and hub.revision else ""
    lines += ["", "## Load the library with modlora", "", "```bash", "pip install modlora",
              f"modlora show {url}", f"modlora route {url} --prompt \"...\" --method arrow",
              f"modlora pull {url} my-library   # a local copy", "```", "", "```python",
              "from modlora.library.remote import open_library", f"library = open_library({url!r})",
              f"adapter = library.get({example!r})  # downloaded on first use, checked against its sha256",
              "```", "", "## Load one expert with PEFT", "",
              f"Each expert is a standard PEFT LoRA adapter in `{prefix}experts/<name>/`"
              + ("" if hub else f" (here after `modlora pull {url} my-library`)") + ":", "", "```python",
              "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({(base_id or base.name)!r})",
              f"model = PeftModel.from_pretrained(base, {repo!r}, subfolder={prefix + 'experts/' + example!r}{rev})",
              "```", ""]
    return "\n".join(lines)
