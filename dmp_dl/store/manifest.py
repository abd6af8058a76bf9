"""The bundle manifest: its one written form, its digest and its schema.

``manifest.json`` is written exactly as ``json.dumps(manifest, indent=1)`` (:func:`manifest_text`)
and carries its own digest under ``manifest_sha256``::

    manifest_sha256 = sha256(canonical JSON of the manifest without manifest_sha256).hexdigest()
    canonical JSON  = json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=True), UTF-8

Reading it (:func:`read_manifest`) checks, in this order: valid UTF-8 JSON; the format name; the
digest (a mismatch: the file was modified or corrupted); the format version; that the file is byte
for byte the written form of its own content (so that no edit, not even one that keeps the meaning
such as an escape's case, loads); then the schema (:func:`check_manifest`): the type and range of
every field the code reads, the known keys of the objects this package writes, and the files named
by other fields being listed under ``files``. Anything else is refused with one
:class:`~dmp_dl.core.errors.BundleError` line naming the file and the field.

The digest is not a signature: whoever can write the bundle can recompute it. It catches
corruption and edits made without dmp_dl; keep bundles where only the exporter can write.

Check a digest by hand::

    python -c "import hashlib, json, sys; m = json.load(open(sys.argv[1])); d = m.pop('manifest_sha256'); \\
    print(d == hashlib.sha256(json.dumps(m, sort_keys=True, separators=(',', ':')).encode()).hexdigest())" manifest.json

Unknown top-level keys are part entries (``export_bundle(parts=...)``) and must be JSON objects;
a part's ``user_aligned`` list names files of the bundle (paths inside it or inside the part's folder).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from dmp_dl.core.errors import BundleError, ConfigError

FORMAT = "dmp_dl.bundle"
FORMAT_VERSION = 2  # 2: manifest digest and schema
MANIFEST = "manifest.json"
DIGEST_KEY = "manifest_sha256"
METRIC = "inner_product"
# files every bundle has (Recommender.load reads them all)
CORE_FILES = ("users.json", "items.json", "user_vectors.npy", "item_vectors.npy", "seen_indptr.npy",
              "seen_items.npy", "item_popularity.npy", "item_index.faiss", "user_index.faiss")
USER_ALIGNED_TYPES = (".npy", ".json", ".parquet")
MAX_DIM = 1 << 16


def canonical_json(obj: Any) -> bytes:
    """The canonical serialisation the digest is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("utf-8")


def digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of ``manifest`` without its digest field."""
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != DIGEST_KEY})).hexdigest()


def manifest_text(manifest: Mapping[str, Any]) -> str:
    """The one written form of a manifest."""
    return json.dumps(manifest, indent=1)


def seal(content: Mapping[str, Any]) -> dict:
    """``content`` as JSON values (anything else as its ``str``), plus its digest (the last key)."""
    plain = json.loads(json.dumps({k: v for k, v in content.items() if k != DIGEST_KEY}, default=str))
    return {**plain, DIGEST_KEY: digest(plain)}


# -- schema --------------------------------------------------------------------------------------
Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Hex16 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
Count = Annotated[int, Field(ge=0)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class _Closed(BaseModel):
    """An object this package writes: known keys only, JSON types taken as they are."""

    model_config = ConfigDict(strict=True, extra="forbid")


class _Open(BaseModel):
    """An object other code may extend: known keys typed, others allowed."""

    model_config = ConfigDict(strict=True, extra="allow")


def _check_time(value: str | None) -> str | None:
    if value is not None:
        try:
            dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not an ISO 8601 time") from None
    return value


class FileEntry(_Closed):
    sha256: Hex64
    bytes: Count


class Counts(_Open):
    users: Count
    items: Count
    seen_pairs: Count


class UserRowsEntry(_Open):
    """Each seen pair's summed event weights (:mod:`dmp_dl.data.recency`): the file, the half-life
    they decay with (null: none) and what ages are measured to."""

    file: Name
    half_life_days: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    reference: str = ""


class IndexEntry(_Open):
    file: Name
    factory: Name
    search_params: str
    metric: Literal["inner_product"]
    ntotal: Count
    exact: bool


class NetworkEntry(_Open):
    class_: Name = Field(alias="class")
    history_len: Count


class ErasureRecord(_Open):
    time: str
    users_removed: Count
    audit_log: str | None = None

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        return _check_time(value)


class PrivacyEntry(_Closed):
    pseudonymized: bool
    algorithm: Literal["hmac-sha256"] | None = None
    id_length: Annotated[int, Field(ge=16, le=64)] | None = None
    key_fingerprint: Hex16 | None = None
    secret_env: Name | None = None
    secret_file: Name | None = None
    erasure_list: Name | None = None
    audit_log: Name | None = None
    dp: dict[str, Any] | None = None
    erasures: list[ErasureRecord] = []

    @model_validator(mode="after")
    def _key_of_pseudonyms(self) -> "PrivacyEntry":
        if self.pseudonymized and (self.algorithm is None or self.id_length is None or self.key_fingerprint is None):
            raise ValueError("pseudonymised ids need algorithm, id_length and key_fingerprint")
        for name in ("erasure_list", "audit_log"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_absolute():
                raise ValueError(f"{name} must be an absolute path, got {value!r}")
        return self


class ShallowEntry(_Open):
    """The served item-item weights: EASE, or EDLAE with ``dropout`` > 0 (same arrays)."""

    kind: Literal["ease"]
    items: Count
    nnz: Count
    l2: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] | None = None


class ScoringEntry(_Open):
    """How recommendations are scored (:mod:`dmp_dl.models.scoring`)."""

    model: Name
    refit: bool
    deep_weight: Annotated[float, Field(allow_inf_nan=False)]
    shallow_weight: Annotated[float, Field(allow_inf_nan=False)]
    ease_l2: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    score: str = ""
    shallow: ShallowEntry | None = None
    shallow_input: Literal["binary", "rows"] = "binary"


SCORING_FILES = ("scoring/item_item_indptr.npy", "scoring/item_item_indices.npy", "scoring/item_item_weights.npy")


class PartEntry(_Open):
    user_aligned: list[Name] = []
    files: list[Name] = []


class RealtimeBehaviour(_Open):
    event_types: list[str]
    half_lives_days: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]
    width: Count


class RealtimeEntry(PartEntry):
    """What real-time updates read (:mod:`dmp_dl.realtime.part`): the training data's last event time,
    the last journal row each journal the run read contributed, and the per-user files."""

    data_end: int | None = None
    journals: dict[Name, Count] = {}
    history_len: Count = 0
    timestamps: bool = True
    behaviour: RealtimeBehaviour | None = None
    categories: Count | None = None


class Manifest(_Open):
    """Every bundle has the fields up to ``files``; an exported model (``export_bundle``) all of them."""

    format: Literal["dmp_dl.bundle"]
    format_version: Literal[2]
    created_at: str
    packages: dict[str, str]
    files: dict[str, FileEntry]
    manifest_sha256: Hex64
    # optional, but never null: readers take an absent key for its default
    trained_at: str = None
    dim: Annotated[int, Field(ge=1, le=MAX_DIM)] = None
    metric: Literal["inner_product"] = None
    counts: Counts = None
    user_rows: UserRowsEntry = None
    indexes: dict[Literal["items", "users"], IndexEntry] = None
    index_options: dict[str, Any] = None
    network: NetworkEntry = None
    propensity: PartEntry = None
    privacy: PrivacyEntry = None
    scoring: ScoringEntry = None
    realtime: RealtimeEntry = None
    config: dict[str, Any] = None

    @field_validator("created_at", "trained_at")
    @classmethod
    def _times(cls, value: str) -> str:
        return _check_time(value)



def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_@]*", str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def _field_error(path: Path, field: str, what: str) -> BundleError:
    return BundleError(f"{path}: field {field}: {what}; the manifest is malformed (export the bundle again)")


def _validate(model: type[BaseModel], value: dict, path: Path, prefix: tuple) -> None:
    try:
        model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        given = err.get("input")
        msg = "missing" if err["type"] == "missing" else err["msg"].splitlines()[0].removeprefix("Value error, ")
        msg = re.sub(r" or instance of \w+", "", msg)
        if err["type"] != "missing" and (given is None or isinstance(given, (str, int, float, bool))) and "got" not in msg:
            msg += f" (got {given!r:.80})"
        raise _field_error(path, _where((*prefix, *err["loc"])) or "(top level)", msg) from None


def check_manifest(manifest: dict, path: Path) -> None:
    """Refuse ``manifest`` (read from ``path``) unless every field has its type, range and known
    keys, and every file other fields name is listed under ``files``."""
    _validate(Manifest, manifest, path, ())
    for name, value in manifest.items():
        if name not in Manifest.model_fields:  # a part entry
            if not isinstance(value, dict):
                raise _field_error(path, _where((name,)), f"a part entry must be an object, got {type(value).__name__}")
            _validate(PartEntry, value, path, (name,))
    files = manifest["files"]
    for name in files:
        rel = PurePosixPath(name)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts or name == MANIFEST or rel.as_posix() != name:
            raise _field_error(path, f"files[{name!r}]", "points outside the bundle")
    if manifest.get("counts") is not None:  # an exported model: the files every such bundle has
        for name in CORE_FILES:
            if name not in files:
                raise _field_error(path, f"files[{name!r}]", "missing (every exported bundle has it)")
    user_rows = manifest.get("user_rows")
    if user_rows is not None and user_rows["file"] not in files:
        raise _field_error(path, "user_rows.file", f"{user_rows['file']!r} is not in the bundle")
    indexes = manifest.get("indexes")
    if indexes is not None:
        for side in ("items", "users"):
            entry = indexes.get(side)
            if entry is None:
                raise _field_error(path, f"indexes.{side}", "missing")
            if entry["file"] not in files:
                raise _field_error(path, f"indexes.{side}.file", f"{entry['file']!r} is not in the bundle")
            count = (manifest.get("counts") or {}).get(side, entry["ntotal"])
            if entry["ntotal"] != count:
                raise _field_error(path, f"indexes.{side}.ntotal", f"{entry['ntotal']} vectors for counts.{side}={count}")
    if manifest.get("index_options") is not None:
        check_index_options(manifest["index_options"], path)
    shallow = (manifest.get("scoring") or {}).get("shallow")
    if shallow is not None:
        for name in SCORING_FILES:
            if name not in files:
                raise _field_error(path, "scoring.shallow", f"{name!r} is not in the bundle")
        n_items = (manifest.get("counts") or {}).get("items", shallow["items"])
        if shallow["items"] != n_items:
            raise _field_error(path, "scoring.shallow.items", f"{shallow['items']} items for counts.items={n_items}")
    for name, entry in part_entries(manifest).items():
        for i, f in enumerate(entry.get("user_aligned") or []):
            where = f"{name}.user_aligned[{i}]"
            if not f.endswith(USER_ALIGNED_TYPES):
                raise _field_error(path, where, f"{f!r} is not a .npy, .json or .parquet file")
            if f not in files and f"{name}/{f}" not in files:
                raise _field_error(path, where, f"{f!r} is not in the bundle")


def part_entries(manifest: Mapping[str, Any]) -> dict[str, dict]:
    """Name -> entry of every object-valued top-level field that may list ``user_aligned`` files."""
    known = set(Manifest.model_fields) - {"propensity", "realtime"}
    return {k: v for k, v in manifest.items() if k not in known and isinstance(v, dict)}


def check_index_options(options: dict, path: Path) -> None:
    """``index_options`` must be :class:`~dmp_dl.index.ann.IndexOptions` fields with valid values."""
    import dataclasses

    from dmp_dl.index.ann import IndexOptions  # faiss: reading a manifest does not need it otherwise

    fields = {f.name: f for f in dataclasses.fields(IndexOptions)}
    for key, value in options.items():
        if key not in fields:
            raise _field_error(path, f"index_options.{key}", f"unknown option (known: {', '.join(fields)})")
        default = fields[key].default
        kind = (int,) if isinstance(default, int) or key == "nlist" else (str,)
        if (value is not None or key != "nlist") and (isinstance(value, bool) or not isinstance(value, kind)):
            raise _field_error(path, f"index_options.{key}", f"must be {kind[0].__name__}, got {value!r:.80}")
    try:
        IndexOptions(**options)
    except ConfigError as exc:
        raise _field_error(path, "index_options", str(exc)) from None


# -- reading -------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict:
    """The verified manifest at ``path`` (see the module docstring for what is checked)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        manifest = json.loads(text)
    except (OSError, ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                          "export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a dmp_dl bundle manifest (format must be {FORMAT!r})")
    recorded = manifest.get(DIGEST_KEY)
    if recorded is not None and recorded != digest(manifest):
        raise BundleError(f"{path}: the manifest does not match its digest ({DIGEST_KEY}): it was modified or is "
                          "corrupt; export the bundle again")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        what = "upgrade dmp_dl" if newer else "export the bundle again with this version"
        raise BundleError(f"{path}: bundle format version {version!r}, this dmp_dl reads {FORMAT_VERSION}; {what}")
    if recorded is None:
        raise BundleError(f"{path}: no manifest digest ({DIGEST_KEY}); export the bundle again with this version")
    if manifest_text(manifest) != text:
        raise BundleError(f"{path}: the manifest was edited (its bytes are not the form dmp_dl writes); "
                          "export the bundle again")
    check_manifest(manifest, path)
    return manifest
