"""The model card (README.md) of a converted folder: hub metadata, provenance, parity, accuracy, usage.

Everything on the card is read from the folder itself (config.json,
parity.json, the weights' `__metadata__`) and from the catalog entry of the
source file, plus the `parityport eval --json` results attached at publishing.
The YAML header is built with huggingface_hub's own `ModelCardData`, so it
parses back with `ModelCard` and its `model-index` round-trips through
`EvalResult`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from converters.display import MESSAGE_LIMIT, PATH_LIMIT, shown, shown_markdown, shown_markdown_code
from converters.errors import InputError

if TYPE_CHECKING:
    from checkpoints.catalog import Entry

CARD_FILE = "README.md"
_HUB_LICENSES = {"apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0",
                 "cc-by-nc-sa-4.0", "cc0-1.0"}
_IMAGE_URL = "http://images.cocodataset.org/val2017/000000039769.jpg"
_SYNTHETIC = "SYNTHETIC"  # how parity.json's first note marks a synthetic source
COMMAND_LIMIT = MESSAGE_LIMIT + 2 * PATH_LIMIT  # a convert command names two paths besides its options


# ---- what the folder says ----------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise InputError(path, f"not valid JSON: {error}") from None


def _folder_facts(folder: Path) -> dict[str, Any]:
    """config.json, parity.json (None if absent), the weights' metadata and weight files."""
    from converters.shards import read_metadata, weight_files

    config = _read_json(folder / "config.json")
    if config is None:
        raise InputError(folder, "not a converted folder (no config.json)")
    return {"config": config, "parity": _read_json(folder / "parity.json"),
            "processor": _read_json(folder / "preprocessor_config.json"),
            "meta": read_metadata(folder), "weights": weight_files(folder)}


def family_name(meta: dict[str, str], config: dict[str, Any]) -> str:
    """What a reader calls the source's family ("BiT", "data2vec-vision 1.0"), from the weights'
    metadata (else config.json's model_type)."""
    from converters.registry import FAMILY_NAMES

    family = meta.get("family")
    return FAMILY_NAMES.get(family, family or str(config.get("model_type", "unknown")))


def is_synthetic(parity: dict[str, Any] | None, meta: dict[str, str] | None = None) -> bool:
    """True when the source was a synthetic stand-in (random values), not real weights: parity.json's
    first note says so, or the weights' metadata marks one (a folder converted with --no-parity has
    only that), or names a stand-in's file (as folders converted before the mark did)."""
    from checkpoints.offline import names_stand_in
    from converters.export import STAND_IN_KEY

    meta = meta or {}
    return (any(str(note).startswith(_SYNTHETIC) for note in (parity or {}).get("notes", []))
            or meta.get(STAND_IN_KEY) == "true" or names_stand_in(meta.get("source_file") or ""))


def folder_is_synthetic(folder: Path) -> bool:
    """`is_synthetic` for a converted folder."""
    facts = _folder_facts(Path(folder))
    return is_synthetic(facts["parity"], facts["meta"])


def catalog_entry(source_file: str | None, source_sha256: str | None = None) -> Entry | None:
    """The catalog Entry the source file is (by sha256, cache name or URL name), or None.

    A synthetic stand-in (`NAME.synthetic.npz`) maps to the entry whose layout
    it copies; the card then says plainly that the weights are not the real ones.
    """
    from checkpoints.catalog import load_catalog
    from checkpoints.offline import STAND_IN_MARK

    name = (source_file or "").replace(STAND_IN_MARK, ".")
    entries = list(load_catalog().values())
    for matches in ([e for e in entries if source_sha256 and e.sha256 == source_sha256],
                    [e for e in entries if e.filename == name],
                    [e for e in entries if e.url_basename == name]):
        if len(matches) == 1:  # a URL name shared by several entries identifies none
            return matches[0]
    return None


def folder_catalog_entry(folder: Path) -> tuple[Entry | None, bool]:
    """The catalog entry a converted folder was made from (None when unknown or not a converted
    folder) and whether its source was a synthetic stand-in rather than the published file."""
    try:
        facts = _folder_facts(Path(folder))
    except InputError:
        return None, False
    meta = facts["meta"]
    return catalog_entry(meta.get("source_file"), meta.get("source_sha256")), is_synthetic(facts["parity"], meta)


CATALOG_RESIZE = {"shortest_edge": "shorter", "squash": "squash"}  # the catalog's resize names -> parity.protocols'


def catalog_crop_offset(name: str, interpolation: str) -> str:
    """How the catalog's protocol `name` rounds its centre crop's offset: "floor" for transformers (the
    catalog's "hub") and big_vision (its "area" protocols, `(H - h) // 2`), "round" for torchvision."""
    return "floor" if name == "hub" or interpolation == "area" else "round"


def published_figure(entry: Entry | None, spec: dict[str, Any]):
    """The catalog's first published top-1 measured with the preprocessing `spec` describes (an eval
    result's `protocol_spec`), or None. The pipeline decides, not its name: the catalog's "hub"
    protocol for data2vec is the hub card's squash to 224, while a converted folder's own
    preprocessor_config.json keeps the original crop.
    """
    return next((p for p in (entry.published if entry else ())
                 if p.protocol in entry.eval and same_preprocessing(p.protocol, entry.eval[p.protocol], spec)), None)


def same_preprocessing(name: str, catalogued: Any, spec: dict[str, Any]) -> bool:
    """Whether the catalog's protocol `name` (a checkpoints.catalog.Protocol) is the run's `spec`:
    resize kind and side, crop, interpolation, mean and std, and the crop's offset rounding
    (`catalog_crop_offset`)."""
    crop = catalogued.crop_size if catalogued.crop_size is not None else catalogued.resize_size
    cropped = crop != catalogued.resize_size or catalogued.resize == "shortest_edge"
    offset = catalog_crop_offset(name, catalogued.interpolation)
    constants = zip((*catalogued.mean, *catalogued.std), (*spec["mean"], *spec["std"]))
    return (CATALOG_RESIZE.get(catalogued.resize) == spec["resize"] and catalogued.resize_size == spec["resize_side"]
            and crop == spec["image_size"] and catalogued.interpolation == spec["interpolation"]
            and (not cropped or spec.get("crop_offset", "round") == offset)
            and all(abs(a - b) < 1e-6 for a, b in constants))


def _recorded_command(folder: Path) -> str | None:
    """The convert command recorded in the folder's current card, if any."""
    if not (folder / CARD_FILE).is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(folder / CARD_FILE).data.to_dict()
    except Exception:  # noqa: BLE001  an unreadable old card only loses the command
        return None
    return (data.get("parityport") or {}).get("command")


# ---- YAML header -------------------------------------------------------------------------------

def license_fields(entry: Entry | None) -> dict[str, str]:
    """The hub's `license` (+ `license_name`, `license_link`): the original repository's terms.

    A catalog entry whose original license is a hub identifier gives it as is
    (`apache-2.0`); any other gives `other` with the license's name and a link
    to where the original repository states it; no entry gives `other`/`unknown`.
    """
    original = entry.license.original if entry is not None else None
    if original is None:
        return {"license": "other", "license_name": "unknown"}
    key = original.lower()
    if key in _HUB_LICENSES:
        return {"license": key}
    fields = {"license": "other", "license_name": re.sub(r"[^a-z0-9.]+", "-", key).strip("-")}
    link = _source_link(entry.license.original_source)
    return fields | ({"license_link": link} if link else {})


def _source_link(source: str | None) -> str | None:
    """A GitHub URL for an `owner/repo path` citation (`google-research/big_transfer LICENSE`)."""
    match = re.match(r"([\w.-]+/[\w.-]+) ([\w./-]+)", source or "")
    return f"https://github.com/{match.group(1)}/blob/HEAD/{match.group(2)}" if match else None


def _published_for(entry: Entry | None, result: dict[str, Any]):
    """The catalog's published ImageNet-1k top-1 for an eval result: for its preprocessing
    (`published_figure`), or, for a result that does not record it (`protocol_spec`), for its
    protocol's name; else None."""
    if "protocol_spec" in result:
        figure = published_figure(entry, result["protocol_spec"])
    else:
        figure = next((p for p in (entry.published if entry else ()) if p.protocol == result.get("protocol")), None)
    return figure if figure is not None and figure.dataset.startswith("imagenet-1k") else None


def _images_note(result: dict[str, Any]) -> str:
    images = result.get("images")
    return "" if images in (None, 50000) else f", {images} images"


def eval_results(evals: Sequence[dict[str, Any]], entry: Entry | None) -> list:
    """huggingface_hub `EvalResult`s: measured top-1/top-5 of each attached eval, published top-1 beside it."""
    from huggingface_hub import EvalResult

    common = dict(task_type="image-classification", task_name="Image Classification",
                  dataset_type="imagenet-1k", dataset_name="ImageNet-1k", dataset_split="validation")
    results = []
    for result in evals:
        protocol = result.get("protocol")
        where = f"protocol {protocol}{_images_note(result)}"
        results.append(EvalResult(**common, metric_type="accuracy", metric_config="top-1",
                                  metric_value=round(float(result["top1"]), 3),
                                  metric_name=f"top-1 accuracy (measured, {where})"))
        if result.get("top5") is not None:
            results.append(EvalResult(**common, metric_type="accuracy", metric_config="top-5",
                                      metric_value=round(float(result["top5"]), 3),
                                      metric_name=f"top-5 accuracy (measured, {where})"))
        published = _published_for(entry, result)
        if published is not None:
            results.append(EvalResult(**common, metric_type="accuracy", metric_config="top-1",
                                      metric_value=published.top1,
                                      metric_name=f"top-1 accuracy (published: {published.cited})"))
    return results


def _header(facts: dict[str, Any], evals: Sequence[dict[str, Any]], entry, name: str,
            command: str | None) -> str:
    from huggingface_hub import ModelCardData

    family = facts["meta"].get("family") or facts["config"].get("model_type", "unknown")
    datasets = ["imagenet-1k"] if evals or _num_labels(facts["config"]) == 1000 else None
    extra = {"parityport": {"command": shown(command, COMMAND_LIMIT)}} if command else {}
    task = "image-classification" if is_classifier(facts["config"]) else "image-feature-extraction"
    data = ModelCardData(library_name="transformers", pipeline_tag=task,
                         tags=["parityport", family, task], datasets=datasets,
                         model_name=shown(name, PATH_LIMIT), eval_results=eval_results(evals, entry) or None,
                         **license_fields(entry), **extra)
    return data.to_yaml().rstrip("\n") + "\n"


def _num_labels(config: dict[str, Any]) -> int | None:
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) else config.get("num_labels")


# ---- body --------------------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _sci(value: Any) -> str:
    return f"{value:.2e}" if isinstance(value, (int, float)) else "n/a"


def _provenance(facts: dict[str, Any], entry, command: str | None) -> list[str]:
    meta, weights = facts["meta"], facts["weights"]
    files = weights[0] if len(weights) == 1 else f"{len(weights)} shards + model.safetensors.index.json"
    rows = [("source file", f"{shown_markdown_code(meta.get('source_file', 'unknown'), PATH_LIMIT)} "
                            f"({shown_markdown(meta.get('source_format', '?'))})"),
            ("source sha256", shown_markdown_code(meta.get('source_sha256', 'unknown'))),
            ("catalog entry", f"{entry.name} ({entry.url or 'no URL'})" if entry else "not in the catalog"),
            ("converter", f"{meta.get('converter', 'unknown')} {meta.get('converter_version', '')}".strip()),
            ("converted as", f"{family_name(meta, facts['config'])} {meta.get('variant', '?')}"),
            ("weights", f"{files}, {facts['config'].get('torch_dtype', 'float32')}"),
            ("command", shown_markdown_code(command, COMMAND_LIMIT) if command else "not recorded")]
    verify = ("`parityport verify DIR` re-checks them, loads the model strictly and runs it." if facts["parity"]
              else "`parityport verify DIR` refuses the folder: it has no parity record.")
    return ["## Provenance", "", *_table(("", ""), rows), "",
            f"Every file in this folder is listed with its sha256 in `SHA256SUMS`; {verify}", ""]


def _logits_max_abs(run: dict[str, Any]) -> Any:
    return next((t.get("max_abs") for t in run.get("taps", []) if t.get("tap") == "logits"), None)


def _parity(parity: dict[str, Any] | None) -> list[str]:
    if parity is None:
        return ["## Parity", "", "**No parity record**: this folder was converted without the "
                "layer-by-layer comparison and is not verified.", ""]
    from parity.report import recorded_failure

    verdict = "PASSED" if parity.get("passed") is True else f"FAILED ({recorded_failure(parity)})"
    rows = [(r.get("side"), r.get("role"), r.get("input"), r.get("dtype"), _sci(_logits_max_abs(r)),
             r.get("first_diverging_tap") or "-",
             "measured" if r.get("role") == "measured" else "pass" if r.get("passed") else "FAIL")
            for r in parity.get("runs", [])]
    return ["## Parity", "",
            f"Source side: {parity.get('source')}. Verdict: **{verdict}**. Every named tap "
            f"({_taps_in_words(parity)}) was compared on the same input tensors; the full "
            "per-tap record is in `parity.json` / `parity.md` / `parity.png`.", "",
            *_table(("side", "role", "input", "weights", "logits max-abs", "first diverging tap", "verdict"),
                    rows), ""]


def _taps_in_words(parity: dict[str, Any], shown: int = 6) -> str:
    """The taps parity.json's first run compared, in order: all of them, or the first and last few
    with their count."""
    taps = [str(t.get("tap")) for t in ((parity.get("runs") or [{}])[0].get("taps") or [])]
    if len(taps) <= shown:
        return ", ".join(taps) or "none recorded"
    return f"{len(taps)} taps: {', '.join(taps[:shown // 2])}, ..., {', '.join(taps[-(shown // 2):])}"


def _accuracy(evals: Sequence[dict[str, Any]], entry) -> list[str]:
    if not evals:
        return []
    rows = []
    for result in evals:
        published = _published_for(entry, result)
        rows.append((result.get("protocol"), result.get("images"), f"{float(result['top1']):.3f}",
                     f"{float(result['top5']):.3f}" if result.get("top5") is not None else "n/a",
                     f"{published.top1:g} ({published.cited})" if published else "none catalogued",
                     result.get("device", "?")))
    return ["## ImageNet-1k validation accuracy", "",
            "Measured on this folder with `parityport eval --json`, beside the published figure "
            "for the same protocol.", "",
            *_table(("protocol", "images", "top-1 (%)", "top-5 (%)", "published top-1 (%)", "device"), rows), ""]


def recorded_notes(meta: dict[str, str]) -> list[str]:
    """The conversion's own notes (fp16 widening, eps, dropped keys) as the weights' metadata records
    them; empty for weights written before they were recorded."""
    from converters.export import NOTES_KEY

    try:
        notes = json.loads(meta.get(NOTES_KEY) or "[]")
    except ValueError:
        return []
    return [str(n) for n in notes] if isinstance(notes, list) else []


def _differences(meta: dict[str, str], parity: dict[str, Any] | None) -> list[str]:
    """parity.json's notes (they include the conversion's), and the conversion's own where parity.json
    lacks them (a folder converted with --no-parity has none)."""
    notes = list(dict.fromkeys([*((parity or {}).get("notes") or []), *recorded_notes(meta)]))
    lines = [f"- {n}" for n in notes] or ["- None recorded."]
    return ["## Known differences", "", *lines, ""]


# PIL's resampling filters by the code transformers' image processors store in `resample`
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _normalisation(mean: Sequence[float], std: Sequence[float]) -> str:
    """"mean 0.5 std 0.5", or per channel "mean 0.485/0.456/0.406 std ..." when they differ."""
    def levels(values: Sequence[float]) -> str:
        text = [f"{float(v):g}" for v in values]
        return text[0] if len(set(text)) == 1 else "/".join(text)

    return f"mean {levels(mean)} std {levels(std)}"


def _pipeline_in_words(resize: str, side: int, crop: int | None, interpolation: str, mean, std) -> str:
    """A resize ("squash" or "shorter"), optional centre crop and normalisation, in the words of
    `parity.protocols.Protocol.describe`."""
    steps = [(f"squash to {side}x{side}" if resize == "squash" else f"shorter side to {side}") + f" {interpolation}"]
    steps += [f"centre crop {crop}"] if crop is not None else []
    return ", ".join(steps + [_normalisation(mean, std)])


def processor_in_words(processor: dict[str, Any]) -> str:
    """What a transformers preprocessor_config.json does to an image, in words, read from its own keys."""
    size, crop = processor.get("size"), processor.get("crop_size")
    size = {"height": size, "width": size} if isinstance(size, int) else size or {}
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop or {}
    interpolation = _RESAMPLE.get(processor.get("resample"), f"resample {processor.get('resample')}")
    if not processor.get("do_resize", True):
        resize = "no resize"
    elif "shortest_edge" in size:
        resize = f"shorter side to {size['shortest_edge']} {interpolation}"
    else:
        resize = f"squash to {size.get('height')}x{size.get('width')} {interpolation}"
    steps = [resize]
    if processor.get("do_center_crop"):
        steps.append(f"centre crop {crop.get('height')}" if crop.get("height") == crop.get("width")
                     else f"centre crop {crop.get('height')}x{crop.get('width')}")
    if processor.get("do_normalize", True):
        steps.append(_normalisation(processor.get("image_mean") or [0, 0, 0], processor.get("image_std") or [1, 1, 1]))
    return ", ".join(steps)


def _preprocessing(facts: dict[str, Any], entry) -> list[str]:
    """What the folder's preprocessor_config.json holds, and the hub's own pipeline where the catalog
    records one that differs."""
    processor = facts["processor"]
    if processor is None:
        return ["## Preprocessing", "", "The folder has no `preprocessor_config.json`.", ""]
    held = processor_in_words(processor)
    text = (f"`preprocessor_config.json` (what `AutoImageProcessor` loads and `parityport eval --protocol hub` "
            f"applies): {held}.")
    hub = entry.eval.get("hub") if entry is not None else None
    if hub is not None:
        words = _pipeline_in_words(CATALOG_RESIZE.get(hub.resize, hub.resize), hub.resize_size,
                                   hub.crop_size, hub.interpolation, hub.mean, hub.std)
        if words != held:
            text += f" The hub's published preprocessor for {entry.name} is another pipeline: {words}."
    return ["## Preprocessing", "", text, ""]


def license_section(entry: Entry | None) -> list[str]:
    """The card's License section: the source's terms, and any conflict with the hub cards' terms."""
    if entry is None:
        return ["## License", "", "The source file is not in parityport's catalog, so its license is "
                "**unknown** (declared as `other`). Check the original checkpoint's terms before use.", ""]
    lic = entry.license
    text = f"The original repository states **{lic.original}** ({lic.original_source})."
    if lic.hub_card and lic.hub_card.lower() != (lic.original or "").lower():
        text += (f" The existing hub model cards state **{lic.hub_card}** ({lic.hub_card_source}). "
                 "These disagree; this card declares the original repository's terms until the "
                 "authors resolve the conflict.")
    return ["## License", "", text, ""]


def is_classifier(config: dict[str, Any]) -> bool:
    """A folder with a classification head (pretrained encoders have none)."""
    return any(a.endswith("ForImageClassification") for a in config.get("architectures") or [])


def usage_snippet(model_id: str, remote_code: bool, classifier: bool = True) -> str:
    """Python that loads the model with the Auto classes and prints the top-5 labels of a photo
    (an encoder without a head: the shape of its features)."""
    trust = ", trust_remote_code=True" if remote_code else ""
    if not classifier:
        return "\n".join([
            "from urllib.request import urlopen", "",
            "import torch",
            "from PIL import Image",
            "from transformers import AutoImageProcessor, AutoModel", "",
            f"model_id = {json.dumps(model_id)}",
            f"processor = AutoImageProcessor.from_pretrained(model_id{trust})",
            f"model = AutoModel.from_pretrained(model_id{trust}).eval()", "",
            f"image = Image.open(urlopen({json.dumps(_IMAGE_URL)})).convert(\"RGB\")",
            "with torch.no_grad():",
            "    features = model(**processor(images=image, return_tensors=\"pt\")).last_hidden_state",
            "print(features.shape)  # batch, tokens, channels",
        ])
    return "\n".join([
        "from urllib.request import urlopen", "",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModelForImageClassification", "",
        f"model_id = {json.dumps(model_id)}",
        f"processor = AutoImageProcessor.from_pretrained(model_id{trust})",
        f"model = AutoModelForImageClassification.from_pretrained(model_id{trust}).eval()", "",
        f"image = Image.open(urlopen({json.dumps(_IMAGE_URL)})).convert(\"RGB\")",
        "with torch.no_grad():",
        "    logits = model(**processor(images=image, return_tensors=\"pt\")).logits",
        "top = logits.softmax(-1)[0].topk(min(5, logits.shape[-1]))",
        "for p, i in zip(top.values.tolist(), top.indices.tolist()):",
        "    print(f\"{p:.3f}  {model.config.id2label[i]}\")",
    ])


# ---- the card ----------------------------------------------------------------------------------

def model_card(folder: Path, evals: list[dict], command: str | None, model_id: str | None = None) -> str:
    """The README.md text for a converted folder: hub YAML header, then the human-readable card.

    `evals` are `parityport eval --json` results (top1, top5, images, protocol,
    model, device) shown with the catalog's published figure and put into
    `model-index`. `command` is the exact convert command (None keeps the one
    the folder's current card records). `model_id` is what the usage snippet
    loads: the hub repo id when publishing, else the folder's path.
    """
    folder = Path(folder)
    facts = _folder_facts(folder)
    command = command or _recorded_command(folder)
    meta = facts["meta"]
    entry = catalog_entry(meta.get("source_file"), meta.get("source_sha256"))
    name = entry.name if entry else Path(meta.get("source_file") or folder.name).stem
    architecture = (facts["config"].get("architectures") or ["?"])[0]
    synthetic = is_synthetic(facts["parity"], meta)
    remote = "auto_map" in facts["config"]
    record = (f"with a layer-by-layer parity record against the source side, "
              f"{shown_markdown(facts['parity'].get('source'))}"
              if facts["parity"] is not None else "without a parity record (converted with `--no-parity`)")
    lines = [f"# {shown_markdown(name, PATH_LIMIT)}: transformers `{architecture}`", "",
             f"The original {family_name(meta, facts['config'])} checkpoint "
             f"{shown_markdown_code(meta.get('source_file', '?'), PATH_LIMIT)} "
             f"converted to safetensors by parityport, {record}.", ""]
    if synthetic:
        lines += ["> **Not the published weights**: this folder was converted from a synthetic file in "
                  "the exact original layout (random values). It proves the pipeline, not the model.", ""]
    lines += [*_provenance(facts, entry, command), *_parity(facts["parity"]), *_accuracy(evals, entry),
              *_preprocessing(facts, entry), *_differences(meta, facts["parity"]), *license_section(entry),
              "## Usage", "", "```python", usage_snippet(model_id or str(folder), remote, is_classifier(facts["config"])),
              "```", ""]
    return "---\n" + _header(facts, evals, entry, name, command) + "---\n\n" + "\n".join(lines)


def write_card(folder: Path, evals: Sequence[dict] = (), command: str | None = None,
               model_id: str | None = None) -> Path:
    """Write `model_card(...)` to `folder/README.md` and return its path (SHA256SUMS is the caller's)."""
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(Path(folder), list(evals), command, model_id))
    return path
