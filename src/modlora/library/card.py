"""The library card: the ``README.md`` a push writes beside a shared library, a Hub model card
(``library_name: modlora``, ``base_model``, tags) with a table of the experts and how to load the library with
modlora and each expert with PEFT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modlora.library.location import RemoteLocation
from modlora.library.store import ExpertLibrary
from modlora.models import EMBEDDED_HUB_ID, hub_id

CARD = "README.md"
SNI_TASK_RE = re.compile(r"^task\d+_\w+$")
SNI_DATASET = "Muennighoff/natural-instructions"
"""The Hub copy of Super-NaturalInstructions (upstream allenai/natural-instructions, an Apache-2.0 collection)."""
BASE_LICENSES = {EMBEDDED_HUB_ID: "apache-2.0"}
"""Licences of base models modlora knows without asking the Hub (others: ``other``, with a note)."""


@dataclass(frozen=True)
class CardLicense:
    """The card's ``license`` and, when it is ``other``, the note that says what to check."""

    license: str
    note: str = ""


def card_license(base_hub_id: str | None, tasks: set[str]) -> CardLicense:
    """``apache-2.0`` when the base model's licence is known to be Apache-2.0 and every task is a
    Super-NaturalInstructions task (an Apache-2.0 collection); otherwise ``other``, with a note naming what decides."""
    base = BASE_LICENSES.get(base_hub_id or "")
    sni = bool(tasks) and all(SNI_TASK_RE.match(t) for t in tasks)
    if base == "apache-2.0" and sni:
        return CardLicense("apache-2.0")
    why = [f"the base model {base_hub_id or 'used'}'s licence" + (f" ({base})" if base else "")]
    why.append("the Super-NaturalInstructions task licences (Apache-2.0 collection; each task records its instance "
               "licence)" if sni else "the licences of the training data")
    return CardLicense("other", "The licence of these adapters follows " + " and ".join(why) + ": check them before "
                       "use.")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def library_card(lib: ExpertLibrary, location: RemoteLocation) -> str:
    """The library's README.md: Hub metadata (``library_name: modlora``, ``base_model`` (the Hub id,
    :func:`modlora.models.hub_id`), ``license`` (:func:`card_license`), ``pipeline_tag: text-generation``,
    ``datasets``, tags), the base's quantisation when it was a GGUF, the experts with their tasks, sizes and metrics,
    and how to load the library (modlora) and each expert (PEFT)."""
    from huggingface_hub import ModelCardData
    base = lib.base_model
    base_id = hub_id(base.name)
    tasks = {t for name in lib.expert_names() for t in lib.entry(name).tasks}
    licence = card_license(base_id, tasks)
    data = ModelCardData(library_name="modlora", base_model=base_id, license=licence.license,
                         pipeline_tag="text-generation",
                         datasets=[SNI_DATASET] if tasks and all(SNI_TASK_RE.match(t) for t in tasks) else None,
                         tags=["modlora", "lora", "peft", "expert-library", "arrow-routing"])
    hub = location.hub
    title = hub.repo_id.split("/")[-1] if hub else location.url.rstrip("/").rsplit("/", 1)[-1]
    lines = ["---", data.to_yaml(), "---", "",
             f"# {title}: a modlora library of {len(lib)} LoRA experts", "",
             f"A library of LoRA experts built with [modlora](https://pypi.org/project/modlora/) for the base model "
             f"`{base.name}`" + (f" ([{base_id}](https://huggingface.co/{base_id}))" if base_id else "") + ".",
             "Route over it zero-shot with Arrow, merge it, or load any expert on its own as a PEFT adapter.", ""]
    if base.quantisation:
        lines += [f"The experts were trained on the {base.quantisation} GGUF of the base, dequantised (weights "
                  f"fingerprint `{base.weights_checksum}`, shapes `{base.shapes_hash}`); applied to the "
                  "unquantised base they differ by the quantisation error only.", ""]
    if licence.note:
        lines += [f"**Licence:** {licence.note}", ""]
    lines += ["| expert | tasks | rank | parameters | size | validation loss | steps |",
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
