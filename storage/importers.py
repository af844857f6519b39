"""Importers: real data layouts -> pair shards (storage/shards.py; ARCHITECTURE.md "Formats").

  - `import_captions`: a folder of images + a caption table ("image,caption" CSV/TSV) with optional
    split lists (one image name per line, `splits/<split>.txt`); one pair per caption (Flickr8k/30k).
  - `import_coco`: COCO-captions JSON (images[], annotations[]) + an image folder.
  - `import_karpathy`: one split of a Karpathy-split JSON (`dataset_coco.json`, `dataset_flickr30k.json`),
    the retrieval test sets of the field (1k Flickr30k / 5k COCO images, 5 captions each).
  - `import_webdataset`: existing webdataset / img2dataset tars (re-packed in the shard layout with
    the image bytes untouched; uids and metadata taken from the `.json` members or a Parquet sidecar).
  - `register_webdataset` (`import_webdataset(in_place=True)`, `aced import datacomp`): the same
    tars used where they are, an img2dataset / DataComp pool registered without copying an image byte:
    only the metadata Parquet and `_dataset.json` are written, whose shard entries point at the tars
    (`storage.shards.register_shards`); samples img2dataset marks as failed are counted and skipped.
  - `import_class_folders`: `<class>/<image>` folders for zero-shot classification (section 4.1):
    caption = class name, label = index of the class among the sorted folder names (recorded as
    "class_folders", so evaluation can map them onto a standard class-name set).

Image bytes are kept as they are when they are JPEG (no re-encode: the pixels the reference model
sees are the originals); other formats are decoded and re-encoded to JPEG for captions/COCO/classes.
Every image is fully decoded once at import, so a corrupt file is caught here, naming the file,
instead of in the middle of training.

Bad input (unreadable/undecodable image, missing file, empty caption, a table row with the wrong
number of fields, duplicate uid, a uid given but not 32-hex, a COCO image id used twice, an image path
that leaves the image folder by '..', an absolute path or a symlink, a file name that is not UTF-8)
raises ShardError naming the file and the sample, or with on_error="skip" is logged and counted
(`_dataset.json` "skipped", "skipped_at_import"); one log line per skip, saying how many pairs it
dropped, so the counts and the log agree. What cannot be counted is always an error: a caption table
whose quoting is broken (CSV is read strictly; TSV has no quoting), two caption tables to choose from,
a truncated tar, a class folder linked from elsewhere. Text files (caption tables, split lists, COCO JSON) must be UTF-8 (a byte-order mark is
accepted). A caption repeated for one image (same image, same text) is one pair: repeats are dropped,
counted (`_dataset.json` "duplicate_captions_dropped") and logged.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from storage import fs
from storage.shards import (IMAGE_EXTS, DatasetInfo, ExternalShard, ImageError, OnError, Sample, ShardError,
                            decode_image, image_format, image_size, make_uid, read_parquet, register_shards, tar_groups,
                            write_shards)
from storage.workspace import area_path

log = logging.getLogger(__name__)

JPEG_QUALITY = 95
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_UID_RE = re.compile(r"^[0-9a-f]{32}$")


def dataset_dir(root: str | os.PathLike, name: str) -> Path:
    """`<root>/datasets/<name>` (name may contain '/')."""
    return area_path(root, "datasets", name, "dataset name")


@dataclass
class _Skips:
    """Counts and logs bad input under on_error="skip"; raises under "raise"."""

    on_error: OnError
    count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    held: list[tuple[str, str, int]] | None = None
    """When a list: (message, kind, n) of each skip, kept to be logged by the parent process
    (`replay`) instead of logged here (a registration worker)."""

    def __post_init__(self):
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def bad(self, msg: str, *, kind: str, n: int = 1) -> None:
        """Raise, or count `n` skipped pairs (all captions of one bad image are one call) and log one
        line that says how many: the import summary is the sum of what these lines say."""
        if self.on_error == "raise":
            raise ShardError(msg)
        if self.held is not None:
            self.held.append((msg, kind, n))
            return
        self.count += n
        self.reasons[kind] = self.reasons.get(kind, 0) + n
        log.warning("skipping %s%s", f"{n} pairs: " if n != 1 else "", msg, extra={"skipped_pairs": n})

    def replay(self, held: list[tuple[str, str, int]]) -> None:
        """Count and log skips a worker held (see `held`), in its order."""
        for msg, kind, n in held:
            self.bad(msg, kind=kind, n=n)

    def snapshot(self) -> tuple[int, dict[str, int]]:
        return self.count, dict(self.reasons)

    def extra(self, since: tuple[int, dict[str, int]] = (0, {})) -> dict:
        """`_dataset.json` keys: pairs skipped (and why) since `since` (a `snapshot()`)."""
        reasons = {k: v - since[1].get(k, 0) for k, v in self.reasons.items() if v - since[1].get(k, 0)}
        return {"skipped_at_import": self.count - since[0], "skip_reasons": reasons}


def load_image(path: Path) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) of an image file: JPEG bytes as-is, other formats re-encoded.
    The image is fully decoded either way (raises ImageError naming the file if it cannot be)."""
    data = path.read_bytes()
    return jpeg_bytes(data, where=str(path))


def jpeg_bytes(data: bytes, *, where: str = "") -> tuple[bytes, int, int]:
    if not data:
        raise ImageError(f"{where}: empty file" if where else "empty file")
    rgb = decode_image(data, where=where)  # the project's one decoder (16-bit greyscale scaled, pixel limit)
    if image_format(data) == "jpg":
        return data, rgb.width, rgb.height
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), rgb.width, rgb.height


def _image_problem(exc: Exception, path: Path) -> str:
    """The message of a failed `load_image(path)`: ImageError already names the file."""
    return str(exc) if isinstance(exc, ImageError) else f"{path}: {exc}"


def _image_id(rel: str) -> str:
    """Image id = path relative to the image folder, without the suffix ("a/b.jpg" -> "a/b")."""
    p = Path(rel)
    return p.with_suffix("").as_posix()


def _image_ids(names: Iterable[str], *, where: str) -> dict[str, str]:
    """{image name: image id}: the name without its suffix, or, for names whose suffix-less forms
    collide ("x.webp" and "x.tiff" in one folder), the whole name, so two files never share an id
    (an id groups the captions of one image in retrieval, and feeds every pair's uid)."""
    names = list(names)
    stems: dict[str, int] = {}
    for n in names:
        stems[_image_id(n)] = stems.get(_image_id(n), 0) + 1
    ids = {n: _image_id(n) if stems[_image_id(n)] == 1 else PurePosixPath(n).as_posix() for n in names}
    owner: dict[str, str] = {}
    for n, i in ids.items():
        if i in owner:
            raise ShardError(f"{where}: images {owner[i]!r} and {n!r} would get the same image id {i!r}: rename one")
        owner[i] = n
    return ids


def _leaves_folder(rel: str) -> bool:
    """True if the relative image path `rel` can name a file outside its image folder (absolute, or with
    a '..' part): a caption table must not pull in any readable image on the machine."""
    return os.path.isabs(rel) or ".." in PurePosixPath(rel).parts


def _outside(path: Path, folder_real: Path) -> str | None:
    """Where `path` really leads ("/etc/passwd") if that is outside the folder whose resolved path is
    `folder_real`, else None. A symlink inside an image folder (`images/x.jpg -> /etc/passwd`,
    `images/d -> /home/u`) must not pull in files from elsewhere any more than a '../' in a caption
    table may; symlinks that stay inside the folder are fine. Checked before the file is opened."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        return f"nowhere ({type(e).__name__}: {e})"
    return None if real == folder_real or real.is_relative_to(folder_real) else str(real)


def read_text(path: Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is accepted and dropped); ShardError naming
    the file and the line of the first byte that is not UTF-8 otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        body = e.object  # without the BOM; e.start counts from here
        line = body.count(b"\n", 0, e.start) + 1
        col = e.start - (body.rfind(b"\n", 0, e.start) + 1) + 1
        raise ShardError(f"{path}:{line}: not UTF-8 (byte {body[e.start]:#04x} at column {col}); "
                         f"save the file as UTF-8") from None


def _raw_name(name: str) -> str | None:
    """repr of the bytes of a file name that is not valid UTF-8 (Python carries such names as lone
    surrogates, which fail later, deep inside JSON/Arrow encoding), or None for a good name."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return repr(os.fsencode(name))
    return None


# --------------------------------------------------------------------------- captions table

def _detect(src: Path, images: Path | None, captions: Path | None, splits: Path | None, *, detect_splits: bool):
    if images is None:
        images = src / "images"
        if not images.is_dir():
            raise FileNotFoundError(f"{src}: no images/ folder (pass --images)")
    if captions is None:
        cands = [src / n for n in ("captions.csv", "captions.tsv", "captions.txt") if (src / n).is_file()]
        if not cands:
            raise FileNotFoundError(f"{src}: no captions.csv / captions.tsv (pass --captions)")
        if len(cands) > 1:  # which one is current? Guessing could import the stale table without a word
            raise ShardError(f"{src}: holds {len(cands)} caption tables ({', '.join(str(c) for c in cands)}): "
                             f"pass --captions to choose one")
        captions = cands[0]
    if splits is None and detect_splits and (src / "splits").is_dir():
        splits = src / "splits"
    return images, captions, splits


def read_caption_table(path: Path, skips: _Skips) -> list[tuple[str, str, int]]:
    """Rows (image name, caption, line number) of a caption table whose header names `image` and `caption`.

    `.csv`: comma-separated with CSV quoting, read strictly: an unterminated quote or text after a
    closing quote is a ShardError naming the file and the line where the row starts (the rest of the
    file cannot be read reliably after it, so this is never a skip). `.tsv`/`.txt`: tab-separated with
    no quoting at all, so a `"` is part of the caption (`"Hi" she said` stays as written, an opening
    quote cannot swallow the following rows). A row whose number of fields differs from the header's
    (an unquoted comma in a caption would otherwise cut it silently) is bad input: ShardError naming
    file:line, or with on_error="skip" a counted, logged skip. Fields have no size limit beyond the
    file's own (a caption of megabytes is read, not a crash in the csv module)."""
    tsv = path.suffix.lower() in (".tsv", ".txt")
    kind = "TSV (tab-separated, no quoting)" if tsv else "CSV"
    text = read_text(path)
    # csv's default field limit (128 KiB) is process-wide; no field can be longer than the file itself
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    out = []
    with io.StringIO(text, newline="") as f:
        reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
                  else csv.reader(f, delimiter=",", strict=True))
        start = 1  # first line of the row being read (a quoted CSV field may span lines)

        def next_row() -> list[str] | None:
            try:
                return next(reader)
            except StopIteration:
                return None
            except csv.Error as e:
                raise ShardError(f"{path}:{start}: malformed {kind} row ({e}); fix the quoting (a caption holding "
                                 f"the delimiter or a quote must be quoted, with quotes doubled)") from None

        header = next_row()
        if header is None:
            raise ShardError(f"{path}: empty caption table")
        header = [h.strip().lower() for h in header]
        if "image" not in header or "caption" not in header:
            raise ShardError(f"{path}: header {header} must name the columns 'image' and 'caption' ({kind})")
        ii, ci = header.index("image"), header.index("caption")
        while True:
            start = reader.line_num + 1
            row = next_row()
            if row is None:
                break
            line = start
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if len(row) != len(header):
                skips.bad(f"{path}:{line}: {len(row)} field(s), but the header has {len(header)} ({kind}; a caption "
                          f"holding the delimiter must be quoted)", kind="wrong number of fields")
                continue
            image, caption = row[ii].strip(), row[ci].strip()
            if not image:
                skips.bad(f"{path}:{line}: row has no image name", kind="no image name")
            elif _leaves_folder(image):
                skips.bad(f"{path}:{line}: image path {image!r} leaves the image folder (absolute or '..'): refused",
                          kind="path outside image folder")
            elif not caption:
                skips.bad(f"{path}:{line}: image {image!r}: empty or missing caption", kind="empty caption")
            else:
                out.append((PurePosixPath(image).as_posix(), caption, line))  # "./a.jpg" is "a.jpg"
    return out


def read_split_lists(splits: Path) -> dict[str, list[str]]:
    """{split: [image names]} from `<splits>/<split>.txt` (one name per line)."""
    out = {}
    for p in sorted(splits.glob("*.txt")):
        out[p.stem] = [PurePosixPath(ln.strip()).as_posix() for ln in read_text(p).splitlines() if ln.strip()]
    if not out:
        raise FileNotFoundError(f"{splits}: no <split>.txt files")
    return out


def _dedupe(caps: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[tuple[int, int]]]:
    """(captions of one image without repeats of the same text, [(dropped line, line it repeats)]):
    the same caption twice for one image is one pair, not two (it would be trained and scored twice)."""
    first: dict[str, int] = {}
    kept, dropped = [], []
    for caption, line in caps:
        if caption in first:
            dropped.append((line, first[caption]))
        else:
            first[caption] = line
            kept.append((caption, line))
    return kept, dropped


def _log_duplicates(table: Path, dropped: list[tuple[int, int]], *, unit: str = "line") -> None:
    if dropped:
        line, orig = dropped[0]
        log.warning("%s: dropped %d duplicate caption(s) (same image, same text; e.g. %s %d repeats %s %d)",
                    table, len(dropped), unit, line, unit, orig)


def _caption_samples(groups: Iterable[tuple[str, list[tuple[str, int]]]], images: Path, captions: Path, *,
                     ids: dict[str, str], source: str, split: str | None, skips: _Skips) -> Iterator[Sample]:
    """Samples for (image name, [(caption, line)]) groups; each image is read and checked once."""
    n = 0
    images_real = images.resolve()
    for image, caps in groups:
        path = images / image
        real = _outside(path, images_real)
        if real is not None:
            skips.bad(f"{path}: leads to {real}, outside the image folder {images} (a symlink): refused (referenced "
                      f"by {captions}:{caps[0][1]})", kind="path outside image folder", n=len(caps))
            continue
        try:
            data, w, h = load_image(path)
        except FileNotFoundError:
            skips.bad(f"{path}: missing image (referenced by {captions}:{caps[0][1]})", kind="missing image", n=len(caps))
            continue
        except (OSError, ValueError) as e:
            skips.bad(f"{_image_problem(e, path)} (referenced by {captions}:{caps[0][1]})", kind="bad image",
                      n=len(caps))
            continue
        image_id = ids[image]
        for ordinal, (caption, _line) in enumerate(caps):
            yield Sample(key=f"{n:08d}", uid=make_uid(source, image_id, caption, ordinal), image_bytes=data,
                         caption=caption, image_id=image_id, width=w, height=h, source=source, split=split)
            n += 1


def import_captions(src: str | os.PathLike, root: str | os.PathLike, name: str, *,
                    images: str | os.PathLike | None = None, captions: str | os.PathLike | None = None,
                    splits: str | os.PathLike | None | bool = None, samples_per_shard: int = 1000,
                    on_error: OnError = "raise", overwrite: bool = False) -> dict[str, DatasetInfo]:
    """Import a folder of images + caption table as datasets under `<root>/datasets/<name>`.

    src: folder with `images/`, `captions.csv` (or .tsv) and optionally `splits/<split>.txt`
        (each of images/captions/splits can be given explicitly instead; splits=False ignores
        split lists even where `src/splits` exists).
    With split lists: one dataset per split, `<name>/<split>`, plus `<name>/other` for captioned
    images in no list (if any). Without: one dataset `<name>`. One pair per caption; pairs of an image
    are consecutive; uid = make_uid(name, image_id, caption, n-th caption of the image).
    Returns {split or "": DatasetInfo}.
    """
    src = Path(src)
    if splits is True:
        raise ValueError("splits must be a folder, None (auto-detect) or False (none)")
    images, captions, splits = _detect(src, Path(images) if images else None, Path(captions) if captions else None,
                                       Path(splits) if splits else None, detect_splits=splits is None)
    skips = _Skips(on_error)
    source = name.split("/")[0]
    rows = read_caption_table(captions, skips)
    table_skips = skips.extra()  # rows of the table itself (no image name, empty caption): no split to blame
    by_image: OrderedDict[str, list[tuple[str, int]]] = OrderedDict()
    for image, caption, line in rows:
        by_image.setdefault(image, []).append((caption, line))
    dropped: dict[str, int] = {}  # image -> repeated captions dropped
    all_dropped = []
    for image, caps in by_image.items():
        by_image[image], d = _dedupe(caps)
        if d:
            dropped[image] = len(d)
            all_dropped += d
    _log_duplicates(captions, sorted(all_dropped))
    ids = _image_ids(by_image, where=str(captions))
    plan: dict[str | None, list[str]]
    if splits is None:
        plan = {None: list(by_image)}
    else:
        lists = read_split_lists(splits)
        owner: dict[str, str] = {}
        for split, names in lists.items():
            for n in names:
                if n in owner and owner[n] != split:
                    raise ShardError(f"{splits}: image {n!r} is in both {owner[n]}.txt and {split}.txt")
                owner[n] = split
        # split lists may name files with or without the suffix
        owner.update({Path(k).stem: v for k, v in list(owner.items()) if Path(k).stem not in owner})
        plan = {s: [] for s in lists}
        plan["other"] = []
        for image in by_image:
            s = owner.get(image, owner.get(Path(image).stem, "other"))
            plan[s].append(image)
        known = set(by_image) | {Path(i).stem for i in by_image}
        unused = [n for names in lists.values() for n in names if n not in known]
        if unused:
            log.warning("%s: %d images in split lists have no caption (e.g. %s)", splits, len(unused), unused[:3])
        if not plan["other"]:
            del plan["other"]
    out = {}
    for split, names in plan.items():
        ds_name = name if split is None else f"{name}/{split}"
        groups = ((n, by_image[n]) for n in names)
        samples = _caption_samples(groups, images, captions, ids=ids, source=source, split=split, skips=skips)
        before = skips.snapshot()
        dups = sum(dropped.get(n, 0) for n in names)
        info = write_shards(samples, dataset_dir(root, ds_name), name=ds_name,
                            source=f"captions:{captions.resolve()}", samples_per_shard=samples_per_shard,
                            on_error=on_error, overwrite=overwrite,
                            extra=lambda: {**skips.extra(before),
                                           "skipped_rows_in_caption_table": table_skips["skipped_at_import"],
                                           "caption_table_skip_reasons": table_skips["skip_reasons"],
                                           "duplicate_captions_dropped": dups})
        out[split or ""] = info
        log.info("imported %s: %d pairs, %d images, %d shards", ds_name, info.rows, len(names), len(info.shards))
    if skips.count:
        log.warning("%s: skipped %d pairs at import: %s", src, skips.count, skips.reasons)
    return out


# --------------------------------------------------------------------------- COCO captions

def import_coco(annotations: str | os.PathLike, images: str | os.PathLike, root: str | os.PathLike, name: str, *,
                split: str | None = None, samples_per_shard: int = 1000, on_error: OnError = "raise",
                overwrite: bool = False) -> DatasetInfo:
    """Import COCO-captions (`{"images": [{id, file_name}], "annotations": [{image_id, caption}]}`)
    with image files under `images` as the dataset `<name>`; one pair per annotation, grouped by image
    in the order of `images[]`; image_id = str(COCO image id); `split` fills the split column."""
    annotations, images = Path(annotations), Path(images)
    try:
        doc = json.loads(read_text(annotations))
        imgs, anns = doc["images"], doc["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{annotations}: not a COCO captions file ({type(e).__name__}: {e})") from None
    skips = _Skips(on_error)
    source = name.split("/")[0]
    files: OrderedDict[str, str] = OrderedDict()
    row_of: dict[str, int] = {}  # COCO image id -> index in images[] (for messages)
    repeated: dict[str, list[int]] = {}  # COCO image id given to two or more images[] -> their indices
    if not isinstance(imgs, list) or not isinstance(anns, list):
        raise ShardError(f"{annotations}: 'images' and 'annotations' must be lists")
    for i, im in enumerate(imgs):
        try:
            iid, file_name = im["id"], im["file_name"]
        except (KeyError, TypeError):
            raise ShardError(f"{annotations}: images[{i}] has no id/file_name") from None
        if not isinstance(iid, (int, str)) or isinstance(iid, bool):
            raise ShardError(f"{annotations}: images[{i}]: id {iid!r} is not an integer or a string")
        if not isinstance(file_name, str) or not file_name.strip():
            raise ShardError(f"{annotations}: images[{i}] (id {iid!r}): file_name {file_name!r} is not a file name")
        iid = str(iid)
        if iid in files:  # which image do its captions describe? Either guess pairs captions with a wrong image
            repeated.setdefault(iid, [row_of[iid]]).append(i)
            continue
        files[iid] = file_name
        row_of[iid] = i
    caps: dict[str, list[tuple[str, int]]] = {}
    for i, a in enumerate(anns):
        iid = str(a.get("image_id")) if isinstance(a, dict) else None
        caption = (a.get("caption") or "").strip() if isinstance(a, dict) and isinstance(a.get("caption"), (str, type(None))) else ""
        if iid not in files:
            skips.bad(f"{annotations}: annotations[{i}]: image_id {iid!r} not in images[]", kind="unknown image_id")
        elif not caption:
            skips.bad(f"{annotations}: annotations[{i}] (image_id {iid}): empty or missing caption", kind="empty caption")
        else:
            caps.setdefault(iid, []).append((caption, i))
    for iid, rows in repeated.items():
        skips.bad(f"{annotations}: images[{'], images['.join(map(str, rows))}] share the id {iid!r}: its "
                  f"{len(caps.get(iid, []))} caption(s) cannot be attached to one image: refused",
                  kind="repeated image id", n=len(caps.get(iid, [])))
        caps.pop(iid, None)
        del files[iid]
    all_dropped = []
    for iid in caps:
        caps[iid], d = _dedupe(caps[iid])
        all_dropped += d
    _log_duplicates(annotations, sorted(all_dropped), unit="annotation")
    for iid, file_name in list(files.items()):
        if iid in caps and _leaves_folder(file_name):
            skips.bad(f"{annotations}: images[{row_of[iid]}] (image_id {iid}): file_name {file_name!r} leaves the "
                      f"image folder (absolute or '..'): refused", kind="path outside image folder", n=len(caps[iid]))
            del caps[iid]

    info = write_shards(_image_caption_samples(files, caps, images, source=source, split=split, skips=skips,
                                               ref=lambda iid: f"COCO image_id {iid}"),
                        dataset_dir(root, name), name=name, source=f"coco:{annotations.resolve()}",
                        samples_per_shard=samples_per_shard, on_error=on_error, overwrite=overwrite,
                        extra=lambda: {**skips.extra(), "duplicate_captions_dropped": len(all_dropped)})
    return info


def _image_caption_samples(files: dict[str, str], caps: dict[str, list[tuple[str, int]]], images: Path, *,
                           source: str, split: str | None, skips: _Skips, ref) -> Iterator[Sample]:
    """Samples of {image id: file name} (in that order) with captions `caps[image id]` (images without
    captions are left out); each image read and checked once; `ref(image id)` says in messages where
    the image was named (COCO's image_id, a Karpathy images[] entry)."""
    n = 0
    images_real = images.resolve()
    for iid, file_name in files.items():
        if iid not in caps:
            continue
        path = images / file_name
        real = _outside(path, images_real)
        if real is not None:
            skips.bad(f"{path}: leads to {real}, outside the image folder {images} (a symlink): refused "
                      f"({ref(iid)})", kind="path outside image folder", n=len(caps[iid]))
            continue
        try:
            data, w, h = load_image(path)
        except FileNotFoundError:
            skips.bad(f"{path}: missing image ({ref(iid)})", kind="missing image", n=len(caps[iid]))
            continue
        except (OSError, ValueError) as e:
            skips.bad(f"{_image_problem(e, path)} ({ref(iid)})", kind="bad image", n=len(caps[iid]))
            continue
        for ordinal, (caption, _) in enumerate(caps[iid]):
            yield Sample(key=f"{n:08d}", uid=make_uid(source, iid, caption, ordinal), image_bytes=data,
                         caption=caption, image_id=iid, width=w, height=h, source=source, split=split)
            n += 1


# --------------------------------------------------------------------------- Karpathy splits

KARPATHY_SPLITS = ("train", "val", "test", "restval")


def import_karpathy(annotations: str | os.PathLike, images: str | os.PathLike, root: str | os.PathLike, name: str, *,
                    split: str = "test", samples_per_shard: int = 1000, on_error: OnError = "raise",
                    overwrite: bool = False) -> DatasetInfo:
    """Import one split of a Karpathy-split caption file (``dataset_coco.json``, ``dataset_flickr30k.json``,
    ``dataset_flickr8k.json``: ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw", ...}],
    "cocoid"?, ...}], "dataset": ...}``) as the retrieval set `<name>`: the images of `split` (the field
    reports the 1k Flickr / 5k COCO "test" split), one pair per sentence ("raw", stripped), in file order.
    Image file = `images`/filepath/filename; image_id = str(cocoid) for COCO (as `import_coco`), else
    the file path without its suffix (as `import_captions` names Flickr images)."""
    annotations, images = Path(annotations), Path(images)
    try:
        doc = json.loads(read_text(annotations))
    except ValueError as e:
        raise ShardError(f"{annotations}: not JSON ({e})") from None
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ShardError(f"{annotations}: not a Karpathy-split file (no 'images' list)")
    if split not in KARPATHY_SPLITS:
        log.warning("%s: split %r is none of Karpathy's %s", annotations, split, KARPATHY_SPLITS)
    skips = _Skips(on_error)
    source = name.split("/")[0]
    files: OrderedDict[str, str] = OrderedDict()
    caps: dict[str, list[tuple[str, int]]] = {}
    where: dict[str, int] = {}  # image id -> index in images[] (for messages)
    seen_splits: dict[str, int] = {}
    all_dropped = []
    for i, im in enumerate(entries):
        at = f"{annotations}: images[{i}]"
        if not isinstance(im, dict):
            raise ShardError(f"{at} is not an object")
        s = im.get("split")
        if not isinstance(s, str):
            raise ShardError(f"{at}: split {s!r} is not a string")
        seen_splits[s] = seen_splits.get(s, 0) + 1
        if s != split:
            continue
        filename, filepath, sentences = im.get("filename"), im.get("filepath", ""), im.get("sentences")
        if not isinstance(filename, str) or not filename.strip() or not isinstance(filepath, str):
            raise ShardError(f"{at}: filepath/filename {filepath!r}/{filename!r} do not name a file")
        if not isinstance(sentences, list):
            raise ShardError(f"{at} ({filename}): 'sentences' is not a list")
        rel = PurePosixPath(filepath, filename).as_posix() if filepath else PurePosixPath(filename).as_posix()
        cocoid = im.get("cocoid")
        if cocoid is not None and (not isinstance(cocoid, (int, str)) or isinstance(cocoid, bool)):
            raise ShardError(f"{at} ({rel}): cocoid {cocoid!r} is not an integer or a string")
        iid = str(cocoid) if cocoid is not None else _image_id(rel)
        if iid in files:  # which image would its captions describe? Refused, as in import_coco
            raise ShardError(f"{at} ({rel}): image id {iid!r} was already given by images[{where[iid]}] "
                             f"({files[iid]})")
        image_caps = []
        for j, sent in enumerate(sentences):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                skips.bad(f"{at}.sentences[{j}] ({rel}): empty or missing 'raw' caption", kind="empty caption")
            else:
                image_caps.append((raw.strip(), j))
        if _leaves_folder(rel):
            skips.bad(f"{at}: image path {rel!r} leaves the image folder (absolute or '..'): refused",
                      kind="path outside image folder", n=len(image_caps))
            continue
        files[iid], where[iid] = rel, i
        if image_caps:
            caps[iid], d = _dedupe(image_caps)
            all_dropped += [(i, k) for k, _ in d]
        else:
            log.warning("%s: no caption: image left out", at)
    if not files:
        raise ShardError(f"{annotations}: no image has split {split!r} (splits: "
                         f"{', '.join(f'{k} ({v})' for k, v in sorted(seen_splits.items())) or 'none'})")
    if all_dropped:
        i, k = all_dropped[0]
        log.warning("%s: dropped %d duplicate caption(s) (same image, same text; e.g. images[%d].sentences[%d])",
                    annotations, len(all_dropped), i, k)
    samples = _image_caption_samples(files, caps, images, source=source, split=split, skips=skips,
                                     ref=lambda iid: f"{annotations.name} images[{where[iid]}]")
    return write_shards(samples, dataset_dir(root, name), name=name,
                        source=f"karpathy:{annotations.resolve()}#{split}", samples_per_shard=samples_per_shard,
                        on_error=on_error, overwrite=overwrite,
                        extra=lambda: {**skips.extra(), "duplicate_captions_dropped": len(all_dropped),
                                       "karpathy_dataset": doc.get("dataset")})


# --------------------------------------------------------------------------- webdataset / img2dataset

def _tar_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    tars = sorted(p for p in src.glob("*.tar") if not p.name.startswith("."))
    if not tars:
        raise FileNotFoundError(f"{src}: no .tar shards")
    return tars


def _sidecar(tar: Path) -> dict[str, dict]:
    """{key: row} of an img2dataset-style `<shard>.parquet` beside `tar`, or {} if there is none."""
    p = tar.with_suffix(".parquet")
    if not p.exists():
        return {}
    try:
        t = read_parquet(p)  # local, or in the same object store as the tar
    except Exception as e:
        raise ShardError(f"{p}: unreadable Parquet sidecar ({type(e).__name__}: {e})") from None
    if "key" not in t.column_names:
        raise ShardError(f"{p}: sidecar has no 'key' column")
    return {str(r["key"]): r for r in t.to_pylist()}


def _tar_damage(tar: Path) -> str | None:
    """Why `tar` is not a whole archive, or None. Python's tarfile ends its iteration quietly, as if at
    the end of the archive, when the file stops (a cut between members or inside a header) or a header
    is damaged, and the samples after that point would vanish uncounted. A whole tar ends in a zero
    block, and every member's data lies inside the file. Headers only (tarfile seeks over the data)."""
    size = tar.stat().st_size
    last = None
    try:
        tf = tarfile.open(tar, mode="r:")
    except (tarfile.TarError, OSError):
        return None  # not a tar at all: the reader's own error names that
    try:
        with tf:
            for info in tf:
                if info.offset_data + info.size > size:
                    return (f"member {info.name!r} needs {info.offset_data + info.size} bytes, the file has {size} "
                            f"(cut short)")
                last = info
            end = tf.offset
    except (tarfile.TarError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    with open(tar, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE:
        return None
    where = f"after member {last.name!r}" if last is not None else "at its start"
    return (f"no end-of-archive block at byte {end} {where}: "
            + ("the file ends there (cut short)" if len(block) < tarfile.BLOCKSIZE else "a damaged header"))


def _check_whole_tar(tar: Path) -> None:
    """ShardError for a cut or damaged tar (`_tar_damage`), also under on_error="skip": the samples after
    the damage cannot be read, so they could not even be counted."""
    why = _tar_damage(tar)
    if why is not None:
        raise ShardError(f"{tar}: truncated tar (or a damaged header): {why}; the samples after that point cannot "
                         f"be read or counted: re-fetch the tar or leave it out")


def _wds_groups(tar: Path, skips: _Skips) -> Iterator[tuple[str, dict[str, bytes]]]:
    try:
        tf = tarfile.open(tar, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{tar}: unreadable tar ({type(e).__name__}: {e})") from None
    with tf:
        _check_whole_tar(tar)
        key, group = None, {}
        try:
            for info in tf:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base or base.startswith("."):
                    continue
                k, ext = base.split(".", 1)
                if "/" in info.name:  # webdataset keys keep the folder part
                    k = info.name.rsplit("/", 1)[0].replace("/", "_") + "_" + k
                if k != key:
                    if key is not None:
                        yield key, group
                    key, group = k, {}
                group[ext.lower()] = tf.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:  # nothing after it can be read (or counted): never a skip
            raise ShardError(f"{tar}: sample key={key!r}: unreadable member ({type(e).__name__}: {e}); truncated tar "
                             f"(or a damaged header): the samples after it cannot be read or counted") from None
        if key is not None:
            yield key, group


def import_webdataset(src: str | os.PathLike, root: str | os.PathLike, name: str, *, samples_per_shard: int = 1000,
                      on_error: OnError = "raise", overwrite: bool = False, in_place: bool = False,
                      **in_place_opts) -> DatasetInfo:
    """Index, validate and re-pack existing webdataset / img2dataset tars as the dataset `<name>`
    (with `in_place`: register them where they are instead, `register_webdataset`).

    src: a folder of `*.tar` (with optional img2dataset `<shard>.parquet` sidecars) or one tar.
    Per key: the image member (jpg/jpeg/png/webp, bytes copied untouched), the caption from `.txt`
    (else the json's or the sidecar's "caption"), uid from the json's or sidecar's 32-hex "uid"
    (else make_uid(name, key, caption, 0)); width/height from the image header; image_id, noisy,
    label and split from the json when present (so our own shards round-trip unchanged).
    """
    if in_place:
        return register_webdataset(src, root, name, on_error=on_error, overwrite=overwrite, **in_place_opts)
    if in_place_opts:
        raise ValueError(f"options {sorted(in_place_opts)} apply only to an in-place registration")
    src = Path(src)
    skips = _Skips(on_error)
    source = name.split("/")[0]

    def samples() -> Iterator[Sample]:
        for tar in _tar_files(src):
            side = _sidecar(tar)
            for key, m in _wds_groups(tar, skips):
                where = f"{tar}: sample key={key!r}"
                meta = _json_member(m, where, skips)
                if meta is None:
                    continue
                row = side.get(key, {})
                exts = [e for e in IMAGE_EXTS if e in m]
                if not exts:
                    skips.bad(f"{where}: no image member (has {sorted(m)})", kind="no image")
                    continue
                data = m[exts[0]]
                try:
                    w, h = image_size(data, decode=True, where=where)
                except ImageError as e:
                    skips.bad(str(e), kind="bad image")
                    continue
                if image_format(data) is None:
                    skips.bad(f"{where}: image is not JPEG/PNG/WebP (kept untouched, so not accepted)", kind="bad image")
                    continue
                try:
                    caption = m["txt"].decode("utf-8").strip() if "txt" in m else (
                        meta.get("caption") or row.get("caption") or "")
                except UnicodeDecodeError as e:
                    skips.bad(f"{where}: .txt caption is not UTF-8 ({e})", kind="bad caption")
                    continue
                caption = caption.strip() if isinstance(caption, str) else ""
                if not caption:
                    skips.bad(f"{where}: empty or missing caption", kind="empty caption")
                    continue
                uid = meta["uid"] if "uid" in meta else row.get("uid")
                if uid is None:  # none given: made as for any other import
                    uid = make_uid(source, str(meta.get("image_id") or key), caption, 0)
                elif not (isinstance(uid, str) and _UID_RE.match(uid)):  # given but not ours: never replaced silently
                    skips.bad(f"{where}: uid {uid!r} is not 32 lowercase hex chars", kind="bad uid")
                    continue
                label = meta.get("label")
                yield Sample(key=key, uid=uid, image_bytes=data, caption=caption,
                             image_id=str(meta.get("image_id") or key), width=w, height=h,
                             source=str(meta.get("source") or source),
                             noisy=meta.get("noisy") if isinstance(meta.get("noisy"), bool) else None,
                             label=label if isinstance(label, int) and not isinstance(label, bool) else None,
                             split=meta.get("split") if isinstance(meta.get("split"), str) else None)

    return write_shards(samples(), dataset_dir(root, name), name=name, source=f"webdataset:{src.resolve()}",
                        samples_per_shard=samples_per_shard, on_error=on_error, overwrite=overwrite,
                        extra=lambda: skips.extra())


class _HashingReader:
    """A file wrapper that hashes every byte read through it: a tar read once, as a stream, gives its
    samples and its sha256 (the registration of a pool costs one read per tar)."""

    def __init__(self, f):
        self._f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self.hash.update(b)
        return b

    def finish(self) -> str:
        while chunk := self.read(1 << 20):  # whatever tarfile left unread (end-of-archive padding)
            pass
        return self.hash.hexdigest()


def _json_member(members: dict[str, bytes], where: str, skips: "_Skips") -> dict | None:
    """A webdataset sample's `.json` member as a dict ({} when there is none); None after counting (or
    raising, without --skip-bad) a member that is not a JSON object."""
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as e:
        skips.bad(f"{where}: bad .json member ({e})", kind="bad json")
        return None
    return meta


def _stream_groups(reader: _HashingReader, tar: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of a tar read as a stream, grouped exactly as `storage.shards.iter_samples`
    groups them (the key is the member path up to the first '.' of its file name), so the keys
    recorded here are the keys every reader looks up."""
    try:
        tf = tarfile.open(fileobj=reader, mode="r|")
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{tar}: unreadable tar ({type(e).__name__}: {e})") from None
    with tf:
        try:
            yield from tar_groups(tf, tar)  # the readers' own grouping, on the stream
        except (tarfile.TarError, OSError) as e:
            raise ShardError(f"{tar}: unreadable or truncated tar ({type(e).__name__}: {e}); "
                             f"a pool is registered only whole: fix or remove the tar") from None


def _failed_in_sidecar(tar: Path, side: dict[str, dict], keys_in_tar: set[str], skips: _Skips,
                       failed: _Skips) -> None:
    """Count (and log, as one line per reason) the sidecar's samples that are not in the tar:
    img2dataset lists every sample it tried in `<shard>.parquet`, and writes to the tar only those
    whose status is "success"."""
    by_why: dict[str, list[str]] = {}
    for key, row in side.items():
        if key in keys_in_tar:
            continue
        status = row.get("status")
        why = f"img2dataset status {status!r}" if status != "success" else "listed as a success but not in the tar"
        by_why.setdefault(why, []).append(key)
    for why, keys in sorted(by_why.items()):
        err = next((side[k].get("error_message") for k in keys if side[k].get("error_message")), None)
        (failed if "status" in why else skips).bad(
            f"{tar.with_suffix('.parquet')}: {len(keys)} sample(s) with {why}, not in {tar.name} "
            f"(e.g. key={keys[0]!r}{f', error {err!r}' if err else ''})",
            kind="failed download" if "status" in why else "missing from tar", n=len(keys))


def _registered_rows(tar: Path, *, source: str, skips: _Skips, failed: _Skips, decode: bool,
                     require_uid: bool) -> ExternalShard:
    """Read one img2dataset / webdataset tar once: its sha256 and the metadata row of every usable
    sample (tar order). A sample is left out, counted and logged when img2dataset's json says it
    failed, when it has no image or no `.txt` caption, when its image does not decode (header, or
    every pixel with `decode`), or, with `require_uid` (DataComp), when no 32-hex uid is found.
    Failed downloads go to `failed` (always counted), everything else to `skips` (raise or count)."""
    side = _sidecar(tar)
    rows: list[dict] = []
    keys: set[str] = set()
    if not fs.is_url(tar) and os.path.isfile(tar):  # (an object-store tar is read once, as a stream: no seeks)
        _check_whole_tar(tar)
    try:
        f = fs.open_read(tar, stream=True)
    except OSError as e:
        raise ShardError(f"{tar}: cannot open ({e})") from None
    with f:
        reader = _HashingReader(f)
        for key, m in _stream_groups(reader, tar):
            where = f"{tar}: sample key={key!r}"
            if key in keys:
                skips.bad(f"{where}: key repeated in the tar (only its first sample is used)", kind="repeated key")
                continue
            keys.add(key)
            meta = _json_member(m, where, skips)
            if meta is None:
                continue
            row = side.get(key, {})
            status = meta.get("status", row.get("status"))
            if status is not None and status != "success":
                failed.bad(f"{where}: img2dataset status {status!r}", kind="failed download")
                continue
            exts = [e for e in IMAGE_EXTS if e in m]
            if not exts:
                skips.bad(f"{where}: no image member (has {sorted(m)})", kind="no image")
                continue
            data = m[exts[0]]
            if image_format(data) is None:
                skips.bad(f"{where}: image is not JPEG/PNG/WebP", kind="bad image")
                continue
            try:
                w, h = image_size(data, decode=decode, where=where)
            except ImageError as e:
                skips.bad(str(e), kind="bad image")
                continue
            if "txt" not in m:
                skips.bad(f"{where}: no .txt caption member", kind="empty caption")
                continue
            try:
                caption = m["txt"].decode("utf-8")  # kept exactly: every reader compares it with the .txt
            except UnicodeDecodeError as e:
                skips.bad(f"{where}: .txt caption is not UTF-8 ({e})", kind="bad caption")
                continue
            if not caption.strip():
                skips.bad(f"{where}: empty caption", kind="empty caption")
                continue
            image_id = str(meta.get("image_id") or key)
            uid = meta["uid"] if "uid" in meta else row.get("uid")
            if not (isinstance(uid, str) and _UID_RE.match(uid)):
                # a uid given but malformed is never replaced (a json uid that is not ours would also fail every read)
                if require_uid or uid is not None or "uid" in meta:
                    skips.bad(f"{where}: no DataComp uid (32 lowercase hex chars) in the .json or sidecar: "
                              f"found {uid!r}", kind="bad uid")
                    continue
                uid = make_uid(source, image_id, caption.strip(), 0)  # as the re-pack import makes it
            label = meta.get("label")
            rows.append({"uid": uid, "key": key, "image_id": image_id, "caption": caption, "width": w, "height": h,
                         "source": str(meta.get("source") or source),
                         "noisy": meta.get("noisy") if isinstance(meta.get("noisy"), bool) else None,
                         "label": label if isinstance(label, int) and not isinstance(label, bool) else None,
                         "split": meta.get("split") if isinstance(meta.get("split"), str) else None})
        sha = reader.finish()
    if side:
        _failed_in_sidecar(tar, side, keys, skips, failed)
    return ExternalShard(tar, sha, rows)


def _register_one(tar: Path, source: str, decode: bool, require_uid: bool, on_error: OnError):
    """`_registered_rows` in a worker process: (shard, held skips, held failed downloads). A bad sample
    under on_error="raise" raises here, and the parent re-raises it."""
    skips, failed = _Skips(on_error, held=[]), _Skips("skip", held=[])
    shard = _registered_rows(tar, source=source, skips=skips, failed=failed, decode=decode, require_uid=require_uid)
    return shard, skips.held, failed.held


def register_webdataset(src: str | os.PathLike, root: str | os.PathLike, name: str, *, relative: bool = False,
                        decode: bool = True, require_uid: bool = False, on_error: OnError = "raise",
                        overwrite: bool = False, workers: int = 1) -> DatasetInfo:
    """Register existing img2dataset / DataComp / webdataset tars as the dataset `<name>` IN PLACE: the
    tars are read once (sha256 + every sample checked) and never copied or changed; the dataset folder
    gets one metadata Parquet per tar and `_dataset.json`, whose shard entries name the tars (absolute
    paths, or with `relative` paths relative to the dataset folder). Every reader then reads the tars
    where they are, after checking their sha256 (`storage.shards.iter_samples`).

    src: a folder of `*.tar` (img2dataset output, `<shard>.parquet` sidecars used for uids and failure
        counts) or one tar.
    decode: decode every image's pixels (as the re-pack import does); False reads only the headers
        (much faster on a large pool; a corrupt body is then found when training reads it).
    require_uid: every sample must carry a 32-hex uid (DataComp); otherwise a missing one is made as
        the re-pack import makes it (make_uid(name, image_id, caption, 0)).
    Samples img2dataset marks as failed (status != "success", no image in the tar) and bad samples are
    counted and logged (`_dataset.json` "skipped_at_import", "skip_reasons"): failed downloads always,
    since a pool has them by design; any other bad sample raises ShardError unless on_error="skip".
    workers: tars read in parallel by that many processes (Python's tar parsing is CPU-bound: one core
        reads ~2-3k img2dataset pairs/s); the result is the same as with one, shard for shard.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    src = fs.as_path(src)  # a folder or an object-store prefix (s3://bucket/pool)
    skips = _Skips(on_error)
    failed = _Skips("skip")  # downloads that failed are part of every pool: counted, never an error
    source = name.split("/")[0]
    tars = _tar_files(src)

    def shards() -> Iterator[ExternalShard]:
        if workers == 1 or len(tars) == 1:
            for tar in tars:
                yield _registered_rows(tar, source=source, skips=skips, failed=failed, decode=decode,
                                       require_uid=require_uid)
            return
        import concurrent.futures
        import multiprocessing

        # spawn: a forked child of a threaded parent (Prefect, Ray) is unsafe; map keeps the tar order.
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(tars)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            n = len(tars)
            try:
                for shard, held, held_failed in pool.map(_register_one, tars, [source] * n, [decode] * n,
                                                         [require_uid] * n, [on_error] * n):
                    skips.replay(held)
                    failed.replay(held_failed)
                    yield shard
            except BaseException:  # an error here or in the consumer: do not read the remaining tars
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def extra() -> dict:
        reasons = {**skips.reasons, **failed.reasons}
        return {"skipped_at_import": skips.count + failed.count, "skip_reasons": reasons,
                "in_place": True, "tars": len(tars)}

    info = register_shards(shards(), dataset_dir(root, name), name=name, source=f"in-place:{fs.resolve(src)}",
                           relative=relative, on_error=on_error, overwrite=overwrite, extra=extra)
    log.info("registered %s in place: %d pairs in %d tars (%d failed downloads, %d other samples skipped)",
             name, info.rows, len(tars), failed.count, skips.count)
    return info


# --------------------------------------------------------------------------- class folders

def _class_images(folder: Path) -> list[str]:
    """Image files below one class folder, as sorted relative posix paths, sub-folders included
    (hidden files and folders left out; symlinked folders not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        out += [(rel / f).as_posix() for f in filenames
                if not f.startswith(".") and Path(f).suffix.lower() in _IMAGE_SUFFIXES]
    return sorted(out)


def import_class_folders(src: str | os.PathLike, root: str | os.PathLike, name: str, *, samples_per_shard: int = 1000,
                         on_error: OnError = "raise", overwrite: bool = False) -> DatasetInfo:
    """Import `<src>/<class>/<image>` as a zero-shot set `<name>`: label = index of the class in the
    sorted folder names, caption = the class name ('_' read as a space), image_id = "<class>/<stem>"
    (the whole file name where two files differ only in their suffix); `_dataset.json` records
    "classnames" (index = label). Images in sub-folders of a class folder (`<class>/<sub>/<image>`)
    belong to that class (image_id "<class>/<sub>/<stem>"); their number is logged and recorded
    ("images_in_subfolders"). A file or folder name that is not UTF-8 is bad input (ShardError naming
    it, or with on_error="skip" a counted, logged skip)."""
    src = Path(src)
    src_real = src.resolve()
    skips = _Skips(on_error)
    folders = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = []
    for cls in folders:
        raw = _raw_name(cls)
        real = _outside(src / cls, src_real)
        if real is not None:
            # An error even under on_error="skip": it is not even listed (it may lead to / or a home folder), so
            # its images could not be counted, and a class left out would renumber every label after it.
            raise ShardError(f"{src / cls}: class folder leads to {real}, outside {src} (a symlink): refused; copy "
                             f"the class folder into {src} or remove the link")
        if raw is None:
            classes.append(cls)
        else:
            skips.bad(f"{src}: class folder name {raw} is not UTF-8", kind="non-UTF-8 name",
                      n=len(_class_images(src / cls)))
    if not classes:
        raise FileNotFoundError(f"{src}: no class folders")
    loose = [p.name for p in src.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES]
    if loose:
        log.warning("%s: %d images outside any class folder ignored (e.g. %r)", src, len(loose), loose[0])
    classnames = [c.replace("_", " ") for c in classes]
    source = name.split("/")[0]
    nested = 0

    def samples() -> Iterator[Sample]:
        nonlocal nested
        n = 0
        for label, cls in enumerate(classes):
            files = []
            for rel in _class_images(src / cls):
                raw = _raw_name(rel)
                if raw is not None:
                    skips.bad(f"{src / cls}: file name {raw} is not UTF-8", kind="non-UTF-8 name")
                else:
                    files.append(rel)
            if not files:
                log.warning("%s: class folder has no images", src / cls)
            sub = sum("/" in rel for rel in files)
            if sub:
                log.info("%s: %d images in sub-folders, imported as class %r", src / cls, sub, classnames[label])
                nested += sub
            ids = _image_ids(files, where=str(src / cls))
            for rel in files:
                p = src / cls / rel
                real = _outside(p, src_real)
                if real is not None:
                    skips.bad(f"{p}: leads to {real}, outside {src} (a symlink): refused", kind="path outside image folder")
                    continue
                try:
                    data, w, h = load_image(p)
                except (OSError, ValueError) as e:
                    skips.bad(_image_problem(e, p), kind="bad image")
                    continue
                image_id = f"{cls}/{ids[rel]}"
                caption = classnames[label]
                yield Sample(key=f"{n:08d}", uid=make_uid(source, image_id, caption, 0), image_bytes=data,
                             caption=caption, image_id=image_id, width=w, height=h, source=source, label=label)
                n += 1
        if nested:
            log.warning("%s: %d images in sub-folders of class folders imported under their top-level class",
                        src, nested)

    return write_shards(samples(), dataset_dir(root, name), name=name, source=f"classes:{src.resolve()}",
                        samples_per_shard=samples_per_shard, on_error=on_error, overwrite=overwrite,
                        extra=lambda: {**skips.extra(), "classnames": classnames, "class_folders": classes,
                                       "images_in_subfolders": nested})
