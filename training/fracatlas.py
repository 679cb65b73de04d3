"""Reading FracAtlas (Abedeen et al., Scientific Data 10, 521, 2023; CC BY 4.0): regions, labels and fracture boxes.

Layout, as published on figshare (doi:10.6084/m9.figshare.22363012) and in its GitHub copy:

- `dataset.csv`: `image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,
  lateral,oblique`, one row per image, 0/1 flags (`mixed` = several regions on one film);
- `images/Fractured/IMGnnnnnnn.jpg` and `images/Non_fractured/IMGnnnnnnn.jpg`;
- `Annotations/PASCAL VOC/IMGnnnnnnn.xml` (one `object` with a `bndbox` per fracture) and
  `Annotations/COCO JSON/COCO_fracture_masks.json` (the same boxes as `[x, y, width, height]`, plus polygons).

`root` may be that folder or its parent holding a `FracAtlas/` folder (the figshare zip unpacks so).

Boxes are in the image as displayed, i.e. after its EXIF orientation (a VOC file's `size` is the displayed size
of the images that carry orientation 6 or 8), which is also the frame `inference.preprocessing` reports.

FracAtlas has no patient identifiers. A record for training therefore names the image itself as its patient
(`image:<id>`): the patient-level split machinery then splits by image, stratified by region and label, which is
weaker than a patient split (two films of one patient can fall in two splits); split files and reports say so.

As in `training.dataset`, nothing is decoded here and problems are collected, not raised.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from training.records import DatasetError, ImageRecord
from training.splits import IMAGE_GROUP_PREFIX

log = logging.getLogger(__name__)

FOLDER_NAME = "FracAtlas"
CSV_NAME = "dataset.csv"
FRACTURED_DIR = "images/Fractured"
NON_FRACTURED_DIR = "images/Non_fractured"
VOC_DIR = "Annotations/PASCAL VOC"
COCO_FILE = "Annotations/COCO JSON/COCO_fracture_masks.json"
REGIONS = ("hand", "leg", "hip", "shoulder")  # the CSV's order
MIXED = "mixed"  # the region of a film showing several regions (kept only when asked for)
VIEWS = ("frontal", "lateral", "oblique")
FLAG_COLUMNS = (*REGIONS, "mixed", "hardware", "multiscan", "fractured", *VIEWS)
CSV_COLUMNS = ("image_id", *REGIONS, "mixed", "hardware", "multiscan", "fractured", "fracture_count", *VIEWS)
SPLIT_UNIT_NOTE = (
    "FracAtlas has no patient identifiers, so this split is by image (seeded, stratified by region and label): "
    "weaker than a patient split, since images of one patient can fall in two splits."
)

BoxSource = Literal["voc", "coco"]


@dataclass(frozen=True)
class Box:
    """One fracture's bounding box in displayed-image pixels (x to the right, y down, continuous coordinates)."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def area(self) -> float:
        return max(0.0, self.x_max - self.x_min) * max(0.0, self.y_max - self.y_min)

    def contains(self, x: float, y: float) -> bool:
        return self.x_min <= x <= self.x_max and self.y_min <= y <= self.y_max


@dataclass(frozen=True)
class FracAtlasImage:
    """One FracAtlas radiograph with what dataset.csv and its annotation say about it."""

    image_id: str  # e.g. "IMG0000019" (the file name without .jpg)
    path: Path
    relative_path: str  # posix, relative to the FracAtlas folder, e.g. "images/Fractured/IMG0000019.jpg"
    region: str  # one of REGIONS, or MIXED for a film of several regions
    regions: tuple[str, ...]  # every region flagged, in REGIONS order
    label: int  # 1 fractured, 0 not
    hardware: bool
    multiscan: bool
    views: tuple[str, ...]
    fracture_count: int
    boxes: tuple[Box, ...] = ()
    annotation_size: tuple[int, int] | None = None  # (width, height) the boxes refer to, when the file says
    box_source: BoxSource | None = None


@dataclass
class FracAtlasData:
    """The images of one FracAtlas folder: those kept, the mixed ones left out, and what looked wrong."""

    root: Path
    images: list[FracAtlasImage]  # sorted by image_id
    mixed_left_out: list[FracAtlasImage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    listed: int = 0  # rows of dataset.csv

    @property
    def regions(self) -> list[str]:
        return sorted({image.region for image in self.images})


def find_root(path: str | Path) -> Path | None:
    """The FracAtlas folder when `path` is one (dataset.csv + images/Fractured + images/Non_fractured) or holds one."""
    given = Path(os.path.abspath(Path(path).expanduser()))
    for candidate in (given, given / FOLDER_NAME):
        folders = (candidate / FRACTURED_DIR, candidate / NON_FRACTURED_DIR)
        if (candidate / CSV_NAME).is_file() and all(folder.is_dir() for folder in folders):
            return candidate
    return None


def is_fracatlas(path: str | Path) -> bool:
    return find_root(path) is not None


def read_fracatlas(path: str | Path, *, keep_mixed: bool = False) -> FracAtlasData:
    """Every image listed in dataset.csv that exists, with its region, label and boxes.

    Mixed films (several regions) are left out unless `keep_mixed`; then their region is MIXED.
    Raises DatasetError when the folder is not FracAtlas, the CSV's header is not FracAtlas's, or no image is left.
    """
    root = find_root(path)
    if root is None:
        raise DatasetError(
            f"{path} is not a FracAtlas folder: expected {CSV_NAME}, {FRACTURED_DIR}/ and {NON_FRACTURED_DIR}/"
        )
    problems: list[str] = []
    rows = _read_rows(root / CSV_NAME)
    coco = _read_coco(root / COCO_FILE, problems) if (root / COCO_FILE).is_file() else {}
    if not (root / VOC_DIR).is_dir():
        log.info("%s: no %s folder; boxes from %s", root, VOC_DIR, COCO_FILE if coco else "nowhere")
    images: list[FracAtlasImage] = []
    mixed: list[FracAtlasImage] = []
    seen: set[str] = set()
    for line, row in rows:
        image = _image(root, line, row, coco, seen, problems)
        if image is None:
            continue
        (images if image.region != MIXED or keep_mixed else mixed).append(image)
    _report_unlisted(root, seen, problems)
    if mixed:
        combos = Counter("+".join(image.regions) for image in mixed)
        problems.append(
            f"{len(mixed)} mixed film(s) (several regions) left out: "
            + ", ".join(f"{combo} {count}" for combo, count in sorted(combos.items()))
        )
    if not images:
        raise DatasetError(f"{root}: no usable image ({len(problems)} problem(s), e.g. {problems[:1]})")
    images.sort(key=lambda image: image.image_id)
    log.info(
        "FracAtlas at %s: %d images kept (%s), %d mixed left out",
        root,
        len(images),
        ", ".join(f"{region} {n}" for region, n in sorted(Counter(i.region for i in images).items())),
        len(mixed),
    )
    if problems:
        log.warning("%d problem(s) while reading %s, e.g. %s", len(problems), root, problems[0])
    return FracAtlasData(root=root, images=images, mixed_left_out=mixed, problems=problems, listed=len(rows))


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [column for column in CSV_COLUMNS if column not in header]
        if missing:
            raise DatasetError(
                f"{path}: not FracAtlas's dataset.csv: missing column(s) {', '.join(missing)}; "
                f"expected {','.join(CSV_COLUMNS)}, got {','.join(header)}"
            )
        reader.fieldnames = header
        return [(reader.line_num, row) for row in reader if any((v or "").strip() for v in row.values())]


def _flags(row: Mapping[str, str | None], where: str, problems: list[str]) -> dict[str, bool] | None:
    flags: dict[str, bool] = {}
    for column in FLAG_COLUMNS:
        value = (row.get(column) or "").strip()
        if value not in ("0", "1"):
            problems.append(f"{where}: {column} must be 0 or 1, got {value!r}; row skipped")
            return None
        flags[column] = value == "1"
    return flags


def _image(
    root: Path,
    line: int,
    row: Mapping[str, str | None],
    coco: Mapping[str, list[Box]],
    seen: set[str],
    problems: list[str],
) -> FracAtlasImage | None:
    """One CSV row as an image, or None (reported) when it cannot be used."""
    name = (row.get("image_id") or "").strip()
    where = f"{CSV_NAME} line {line} ({name or 'no image_id'})"
    if not name or "/" in name or "\\" in name or name.startswith("."):
        problems.append(f"{where}: image_id must be a file name like IMG0000019.jpg; row skipped")
        return None
    if name in seen:
        problems.append(f"{where}: listed twice; the repeat is skipped")
        return None
    seen.add(name)
    flags = _flags(row, where, problems)
    count_text = (row.get("fracture_count") or "").strip()
    if flags is None or not count_text.isdigit():
        if flags is not None:
            problems.append(f"{where}: fracture_count must be a whole number, got {count_text!r}; row skipped")
        return None
    regions = tuple(region for region in REGIONS if flags[region])
    if not regions:
        problems.append(f"{where}: no region flagged (hand, leg, hip, shoulder); row skipped")
        return None
    if flags["mixed"] != (len(regions) > 1):
        problems.append(f"{where}: mixed={int(flags['mixed'])} but regions {'+'.join(regions)}; taken as flagged")
    region = regions[0] if len(regions) == 1 and not flags["mixed"] else MIXED
    folder = _folder_of(root, name)
    if folder is None:
        problems.append(f"{where}: no such file in {FRACTURED_DIR}/ or {NON_FRACTURED_DIR}/; skipped")
        return None
    label = _label(flags["fractured"], folder == FRACTURED_DIR, int(count_text), where, problems)
    boxes, size, source = _boxes(root, Path(name).stem, coco, where, problems)
    if label == 1 and not boxes:
        problems.append(f"{where}: fractured but no fracture box found")
    if boxes and len(boxes) != int(count_text):
        problems.append(f"{where}: fracture_count {count_text} but {len(boxes)} box(es) in its {source} annotation")
    return FracAtlasImage(
        image_id=Path(name).stem,
        path=root / folder / name,
        relative_path=f"{folder}/{name}",
        region=region,
        regions=regions,
        label=label,
        hardware=flags["hardware"],
        multiscan=flags["multiscan"],
        views=tuple(view for view in VIEWS if flags[view]),
        fracture_count=int(count_text),
        boxes=tuple(boxes),
        annotation_size=size,
        box_source=source,
    )


def _folder_of(root: Path, name: str) -> str | None:
    for folder in (FRACTURED_DIR, NON_FRACTURED_DIR):
        if (root / folder / name).is_file():
            return folder
    return None


def _label(flag: bool, in_fractured_folder: bool, fracture_count: int, where: str, problems: list[str]) -> int:
    """`fractured` decides, unless its folder and fracture_count both say otherwise (then it is a typo)."""
    if flag == in_fractured_folder:
        return int(flag)
    folder = FRACTURED_DIR if in_fractured_folder else NON_FRACTURED_DIR
    if (fracture_count > 0) == in_fractured_folder:
        problems.append(
            f"{where}: fractured={int(flag)} but the image is in {folder}/ and fracture_count is {fracture_count}; "
            f"labelled {'fractured' if in_fractured_folder else 'not fractured'} (folder and count agree)"
        )
        return int(in_fractured_folder)
    problems.append(f"{where}: fractured={int(flag)} but the image is in {folder}/; using dataset.csv")
    return int(flag)


def _boxes(
    root: Path, stem: str, coco: Mapping[str, list[Box]], where: str, problems: list[str]
) -> tuple[list[Box], tuple[int, int] | None, BoxSource | None]:
    """The image's fracture boxes: its VOC file when there is one, else the COCO file's entry."""
    voc = root / VOC_DIR / f"{stem}.xml"
    if voc.is_file():
        try:
            boxes, size = parse_voc(voc)
        except ValueError as error:
            problems.append(f"{where}: {VOC_DIR}/{voc.name}: {error}; no boxes used")
            return [], None, None
        return boxes, size, "voc"
    if f"{stem}.jpg" in coco:
        return coco[f"{stem}.jpg"], None, "coco"
    return [], None, None


def parse_voc(path: Path) -> tuple[list[Box], tuple[int, int] | None]:
    """A PASCAL VOC file's boxes (every `object/bndbox`) and `size` (width, height); ValueError when malformed."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise ValueError(f"not readable XML ({error})") from error
    if root.tag != "annotation":
        raise ValueError(f"expected a PASCAL VOC <annotation>, got <{root.tag}>")
    size = None
    width, height = root.findtext("size/width"), root.findtext("size/height")
    if width and height:
        try:
            size = (int(float(width)), int(float(height)))
        except ValueError as error:
            raise ValueError(f"size must be numbers, got {width!r} x {height!r}") from error
    boxes = []
    for number, element in enumerate(root.findall("object"), start=1):
        texts = [element.findtext(f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")]
        try:
            x_min, y_min, x_max, y_max = (float(text or "") for text in texts)
        except ValueError as error:
            raise ValueError(f"object {number}: bndbox needs numeric xmin, ymin, xmax, ymax, got {texts}") from error
        if x_max <= x_min or y_max <= y_min:
            raise ValueError(f"object {number}: empty box {texts}")
        boxes.append(Box(x_min, y_min, x_max, y_max))
    return boxes, size


def _read_coco(path: Path, problems: list[str]) -> dict[str, list[Box]]:
    """file name -> boxes from the COCO file (`bbox` is [x, y, width, height])."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {image["id"]: image["file_name"] for image in data["images"]}
        boxes: dict[str, list[Box]] = {}
        for annotation in data["annotations"]:
            x, y, width, height = (float(v) for v in annotation["bbox"])
            boxes.setdefault(names[annotation["image_id"]], []).append(Box(x, y, x + width, y + height))
    except (OSError, ValueError, KeyError, TypeError) as error:
        problems.append(f"{COCO_FILE}: unreadable ({type(error).__name__}: {error}); not used")
        return {}
    return boxes


def _report_unlisted(root: Path, listed: set[str], problems: list[str]) -> None:
    for folder in (FRACTURED_DIR, NON_FRACTURED_DIR):
        extra = sorted(
            name for name in os.listdir(root / folder) if name.lower().endswith(".jpg") and name not in listed
        )
        if extra:
            problems.append(f"{len(extra)} image(s) in {folder}/ not listed in {CSV_NAME}, e.g. {extra[0]}; ignored")


# ------------------------------------------------------------------------------------------ training records


def as_records(images: Sequence[FracAtlasImage]) -> list[ImageRecord]:
    """Training records: the region is the part, the image its own patient and study (no patient ids)."""
    return [
        ImageRecord(
            path=image.path,
            relative_path=image.relative_path,
            part=image.region,
            patient=f"{IMAGE_GROUP_PREFIX}{image.image_id}",
            study=f"{image.region}/{image.image_id}",
            label=image.label,
            origin=None,
        )
        for image in images
    ]


def training_records(root: Path, problems: list[str]) -> list[ImageRecord]:
    """What `training.dataset.read_dataset` lists for a FracAtlas folder (mixed films left out and reported)."""
    data = read_fracatlas(root)
    problems.extend(data.problems)
    return as_records(data.images)
