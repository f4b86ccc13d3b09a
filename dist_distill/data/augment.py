"""Augmentation at prepare time: records -> more records, before tokenization into the token store.

A recipe lists augmentations under ``data.augment`` (recipe.AugmentSpec); each is applied in order to
every record of data.train while the store is built (data/store.py, one chunk of CHUNK records at a
time, so a 1M -> 3M expansion holds at most CHUNK x the product of the entries' (keep_original + copies)
records in memory). Entry k turns each
record it receives into ``[record] * keep_original + [fn(record, copy=c) for c in range(copies)]``.

The user hook: ``fn`` names a function as ``"package.module:function"`` or ``"path/to/file.py:function"``
with the signature::

    def augment(record: dict, *, rng: random.Random, copy: int, fields: list[str], **params) -> dict | None

It receives a deep copy of one record (the fields of the data file) and returns the augmented record,
or None to make no sample for this copy. `rng` is seeded from (seed, entry, record index, variant,
copy), so the output is the same whichever rank or chunk calls it; a function that uses another
source of randomness is not deterministic and a rebuilt store would differ. Back-translation is such
a function around a translation model (see README, Augmentation).

Identity (the store key, data/store.py): every entry's settings, plus for the built-in the sha256 of
its table file, for a user function ``module:qualname`` and either the recipe's `version` string or,
when none is given, the sha256 of the source file of the function's module. A change in a helper the
function imports from another module is not seen by that hash: give a `version` then.

The built-in ``synonyms`` needs no model: each word (``\\w+``) found in the table (case-insensitive)
is replaced with probability `probability` by one of its synonyms chosen with `rng`, capitalised like
the word it replaces.
"""

from __future__ import annotations

import copy as copy_mod
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import random
import re
import sys
from pathlib import Path
from typing import Callable

from dist_distill.errors import UserError

WORD = re.compile(r"\w+")


# ---- the built-in ----------------------------------------------------------------------------------
def load_synonym_table(path: str) -> dict[str, list[str]]:
    """{lower-case word: [synonym, ...]} from a .json object or a .tsv file ("word<TAB>syn<TAB>syn...")."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"data.augment: synonym table {path} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"data.augment: synonym table {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                                for v in raw.values()):
            raise UserError(f"data.augment: synonym table {path}: expected a JSON object "
                            '{"word": ["synonym", ...]} of strings')
        items = raw.items()
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            word, *syns = [c.strip() for c in line.split("\t")]
            if not word or not any(syns):
                raise UserError(f"data.augment: synonym table {path} line {n}: expected "
                                "word<TAB>synonym[<TAB>synonym...]")
            items.append((word, [s for s in syns if s]))
    table: dict[str, list[str]] = {}
    for word, syns in items:
        if syns:
            table.setdefault(word.lower(), []).extend(syns)
    return table


def _match_case(word: str, replacement: str) -> str:
    if len(word) > 1 and word.isupper():
        return replacement.upper()
    if word[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def replace_synonyms(text: str, table: dict[str, list[str]], probability: float, rng: random.Random) -> str:
    """`text` with each table word replaced with `probability` (one rng.random() per table word, in text
    order, and one rng.choice() per replacement: the draws, hence the output, are fixed by rng's seed)."""
    def sub(m: re.Match) -> str:
        word = m.group(0)
        syns = table.get(word.lower())
        if syns is None or rng.random() >= probability:
            return word
        return _match_case(word, rng.choice(syns))

    return WORD.sub(sub, text)


def synonyms(record: dict, *, rng: random.Random, copy: int, fields: list[str], table: dict,
             probability: float) -> dict | None:
    """The built-in augmentation: synonym replacement in the string `fields` of `record`; None (no sample) when
    nothing was replaced, so a copy is never a duplicate of its original."""
    changed = False
    for name in fields:
        value = record.get(name)
        if value is None:
            continue  # the store reports the missing field as a bad row
        if not isinstance(value, str):
            raise UserError(f"data.augment: the synonyms built-in rewrites string fields; field {name!r} is "
                            f"{type(value).__name__} (set data.augment[].fields)")
        new = replace_synonyms(value, table, probability, rng)
        changed |= new != value
        record[name] = new
    return record if changed else None


# ---- resolving the recipe's entries -----------------------------------------------------------------
@dataclasses.dataclass
class Augmenter:
    """One resolved data.augment entry: the function to call and what names it in the store key."""

    position: int
    fn: Callable
    kwargs: dict
    spec: object
    identity: dict

    def expand(self, record: dict, index: int, variant: str) -> list[tuple[dict, str]]:
        """[(record, variant label)] this entry makes of one record (index: its source record number)."""
        out = [(record, variant)] if self.spec.keep_original else []
        for c in range(self.spec.copies):
            rng = random.Random(_seed(self.spec.seed, self.position, index, variant, c))
            try:
                new = self.fn(copy_mod.deepcopy(record), rng=rng, copy=c, **self.kwargs)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - a user function's failure, named with its record
                raise UserError(f"data.augment[{self.position}] {self.spec.fn} failed on record {index} (copy {c}): "
                                f"{type(err).__name__}: {err}") from err
            if new is not None:
                if not isinstance(new, dict):
                    raise UserError(f"data.augment[{self.position}] {self.spec.fn} returned a "
                                    f"{type(new).__name__} for record {index}, expected a dict (a record) or None")
                out.append((new, f"{variant}.{self.position}:{c}"))
        return out


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import_user_fn(name: str, key: str) -> tuple[Callable, str, Path | None]:
    """(function, "module:qualname", its module's source file) of "pkg.mod:fn" or "file.py:fn"."""
    target, attr = name.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"{key}.fn={name!r}: file {path} does not exist")
        mod_name = f"dd_augment_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        module = sys.modules.get(mod_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        label = target  # as written: the key does not depend on where the checkout lies (the source hash does the rest)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise UserError(f"{key}.fn={name!r}: cannot import module {target!r} ({err}); put it on PYTHONPATH "
                            "or give a file path, e.g. path/to/file.py:function") from None
        label = target
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"{key}.fn={name!r}: {label} has no attribute {attr!r}")
    if not callable(fn):
        raise UserError(f"{key}.fn={name!r}: {attr} is not a function")
    source = inspect.getsourcefile(module) if hasattr(module, "__file__") else None
    return fn, f"{label}:{getattr(fn, '__qualname__', attr)}", Path(source) if source else None


def resolve(data_spec) -> list[Augmenter]:
    """The Augmenters of data_spec.augment, in order (imports user functions, loads synonym tables)."""
    tables = [_stat(a.table) for a in data_spec.augment]  # a table edited in place is a new key
    return list(_resolve(json.dumps([dataclasses.asdict(a) for a in data_spec.augment], sort_keys=True),
                         data_spec.prompt_field, tuple(tables)))


def _stat(path: str | None) -> tuple | None:
    if path is None or not Path(path).expanduser().is_file():
        return None
    st = Path(path).expanduser().stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _resolve(specs_json: str, prompt_field: str, _tables: tuple) -> tuple[Augmenter, ...]:
    from dist_distill.recipe import AugmentSpec

    out = []
    for i, raw in enumerate(json.loads(specs_json)):
        spec, key = AugmentSpec(**raw), f"data.augment[{i}]"
        fields = list(spec.fields) or [prompt_field]
        ident = {"fn": spec.fn, "copies": spec.copies, "keep_original": spec.keep_original, "fields": fields,
                 "seed": spec.seed}
        if spec.fn == "synonyms":
            table = load_synonym_table(spec.table)
            ident.update(probability=spec.probability, table_sha256=_file_sha256(Path(spec.table).expanduser()))
            out.append(Augmenter(i, synonyms, {"fields": fields, "table": table, "probability": spec.probability},
                                 spec, ident))
        else:
            fn, qualname, source = _import_user_fn(spec.fn, key)
            ident.update(function=qualname, params=spec.params, version=spec.version)
            if spec.version is None:
                if source is None or not source.is_file():
                    raise UserError(f"{key}.fn={spec.fn!r}: its source file cannot be found to fingerprint it; "
                                    f"set {key}.version")
                ident["source_sha256"] = _file_sha256(source)
            out.append(Augmenter(i, fn, {"fields": fields, **spec.params}, spec, ident))
    return tuple(out)


def identity(augmenters: list[Augmenter]) -> list[dict]:
    """What the store key hashes for these augmentations."""
    return [a.identity for a in augmenters]


def expand(augmenters: list[Augmenter], records: list, start: int) -> list[tuple[object, int, str]]:
    """[(record or BadRow, source record index, variant label)] of records[k] = source record start + k after
    every augmentation ("" is the original; a BadRow passes through, not augmented)."""
    items = [(rec, start + k, "") for k, rec in enumerate(records)]
    for aug in augmenters:
        nxt = []
        for rec, index, variant in items:
            if not isinstance(rec, dict):
                nxt.append((rec, index, variant))
                continue
            nxt.extend((new, index, label) for new, label in aug.expand(rec, index, variant))
        items = nxt
    return items
