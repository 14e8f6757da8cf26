"""Check or fill ``weights_manifest.json`` entries from the Hub, or print the table of available weights.

    python -m export.manifest check                  # every entry: sha256, size, revision against the Hub
    python -m export.manifest fill densenet121_efficient.ra_in1k   # write the Hub's values into empty fields
    python -m export.manifest table                  # the Markdown table of README.md

Every action first checks the manifest against its JSON Schema (exit 1 naming the field). ``check`` exits 1 if a
recorded value differs from the Hub's or a file is missing; ``fill`` fills only empty fields (LFS sha256 and size,
the commit the revision resolves to now) and writes nothing if a recorded value differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from densenet_efficient.pretrained import manifest as _manifest
from densenet_efficient.pretrained.errors import ManifestError
from densenet_efficient.pretrained.files import write_atomically
from densenet_efficient.pretrained.manifest import MANIFEST_FILENAME, PretrainedCfg, manifest_path

PACKAGED = Path(_manifest.__file__).parent / MANIFEST_FILENAME
SCHEMA = PACKAGED.with_name("weights_manifest.schema.json")
ROOT_COPY = Path(__file__).resolve().parents[1] / MANIFEST_FILENAME

FIELDS = ("sha256", "size", "revision")


def validate_manifest(manifest: Any, where: str | Path) -> None:
    """:class:`ManifestError` naming ``where`` and the field unless ``manifest`` satisfies its JSON Schema, keys are
    ``model.tag``, entries make a :class:`PretrainedCfg`, url hashes agree and every default tag has an entry."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    if (error := jsonschema.exceptions.best_match(validator.iter_errors(manifest))) is not None:
        field = "".join(f"[{part!r}]" for part in error.absolute_path) or "(top level)"
        raise ManifestError(f"{where} is not a valid weights manifest: {field}: {error.message}")
    for key, entry in manifest["weights"].items():
        if key != f"{entry['model']}.{entry['tag']}":
            raise ManifestError(f"{where}: entry {key!r} is for {entry['model']}.{entry['tag']}; keys are model.tag")
        PretrainedCfg.from_dict(entry)  # ManifestError naming the entry: its input, metrics, files
        url = entry["url"]
        if url and url["sha256"] and not url["sha256"].startswith(url["sha256_prefix"]):
            raise ManifestError(f"{where}: {key!r}: url.sha256 {url['sha256']} does not start with url.sha256_prefix")
    for model, tag in manifest["default_tags"].items():
        if f"{model}.{tag}" not in manifest["weights"]:
            raise ManifestError(f"{where}: the default tag of {model!r} is {tag!r}, which has no entry")


def check_and_fill(manifest: dict[str, Any], keys: Sequence[str], fill: bool, **hub_options: Any) -> bool:
    """Print one line per entry; with ``fill``, put the Hub's values into empty fields. True if all agree."""
    from huggingface_hub import HfApi

    agree, api = True, HfApi(**hub_options)
    for key in keys:
        hub = manifest["weights"][key]["hub"]
        if hub is None:
            print(f"{key}: no Hub file (URL source only)")
            continue
        try:  # the Hub's LFS sha256, size and full-commit revision of the file (at its revision or main)
            revision = api.model_info(hub["repo_id"], revision=hub["revision"] or "main").sha
            if not (infos := api.get_paths_info(hub["repo_id"], hub["filename"], revision=revision)):
                raise FileNotFoundError(f"{hub['repo_id']} has no {hub['filename']} at {revision}")
            info = infos[0]
            facts = {"sha256": info.lfs.sha256 if info.lfs else None, "size": info.size, "revision": revision}
        except Exception as error:  # any Hub error is this entry's failure; the others are still checked
            print(f"{key}: FAILED {type(error).__name__}: {str(error).splitlines()[0]}")
            agree = False
            continue
        empty = [field for field in FIELDS if hub[field] is None]
        verified = [field for field in FIELDS if hub[field] is not None and hub[field] == facts[field]]
        mismatched = [f"{f}: manifest {hub[f]}, Hub {facts[f]}" for f in FIELDS if f not in {*empty, *verified}]
        print(
            f"{key}: verified {', '.join(verified) or 'nothing'}"
            + (f"; MISMATCH {'; '.join(mismatched)}" if mismatched else "")
            + (f"; {'filled' if fill else 'empty'} {', '.join(f'{f}={facts[f]}' for f in empty)}" if empty else "")
        )
        agree = agree and not mismatched
        if fill:
            hub.update({field: facts[field] for field in empty})
    return agree


def table(manifest: dict[str, Any]) -> str:
    """Markdown table of the weights: top-1/top-5 (who measured, size, crop), license, how each source is pinned."""
    header = "| weights | default | top-1 / top-5 (reported by, size, crop) | license | source | Hub file | pinned "
    rows = [header + "| torchvision fallback |", "|---|---|---|---|---|---|---|---|"]
    for key, entry in manifest["weights"].items():
        default = "yes" if manifest["default_tags"].get(entry["model"]) == entry["tag"] else ""
        results = "<br>".join(
            f"{m['top1']:.3f} / {'-' if m['top5'] is None else format(m['top5'], '.3f')} "
            f"({m['reported_by']}, {m['image_size']} px, crop {m['crop_pct']:g})"
            for m in entry["metrics"]
        )
        hub = entry["hub"]
        hub_cell = f"[{hub['repo_id']}](https://huggingface.co/{hub['repo_id']})" if hub else ""
        pinned = ", ".join(field for field in FIELDS if hub and hub[field] is not None) or "no"
        url, fallback = entry["url"], ""
        if url:  # its whole sha256 pinned, or only the hash prefix in its name (torchvision's check)
            pinning = f"only the {len(url['sha256_prefix'])}-hex-digit sha256 prefix in its name"
            fallback = f"{url['url']} ({'sha256' if url['sha256'] else pinning})"
        rows.append(
            f"| `{key}` | {default} | {results} | {entry['license'] or 'unknown'} | {entry['source']} "
            f"| {hub_cell} | {pinned} | {fallback} |"
        )
    return "\n".join(rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.manifest", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("check", "fill", "table"))
    parser.add_argument("keys", nargs="*", help="model.tag entries (default: all)")
    parser.add_argument("--manifest", type=Path, help=f"manifest file (default: {manifest_path()})")
    parser.add_argument("--endpoint", help="Hub address (default: HF_ENDPOINT or huggingface.co)")
    parser.add_argument("--token", help="Hub token for private repos")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = (args.manifest or manifest_path()).resolve()  # resolved: fill rewrites the file, not a link to it
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        validate_manifest(manifest, path)  # e.g. a result that omits the image size or crop it was measured at
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.action == "table":
        print(table(manifest))
        return 0
    if unknown := sorted(set(args.keys) - set(manifest["weights"])):
        print(f"error: no entries {unknown}; entries: {', '.join(manifest['weights'])}", file=sys.stderr)
        return 2
    keys, fill = args.keys or list(manifest["weights"]), args.action == "fill"
    agree = check_and_fill(manifest, keys, fill, endpoint=args.endpoint, token=args.token)
    if fill and agree:
        # The packaged manifest and its root copy (not a link: torch.hub's GitHub zips turn links into text files).
        copies = [path] + ([ROOT_COPY] if path == PACKAGED.resolve() and ROOT_COPY.is_file() else [])
        for copy in copies:
            write_atomically(copy, (json.dumps(manifest, indent=2) + "\n").encode())
            print(f"wrote {copy}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
