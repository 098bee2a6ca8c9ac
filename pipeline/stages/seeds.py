"""``seeds``: read seed tasks into typed :class:`~pipeline.records.Task` records.

Formats: Self-Instruct ``seed_tasks.jsonl``; Alpaca JSON (a list of instruction/input/output); a
Super-NaturalInstructions task file (Definition, Positive Examples, Instances); and anything ``datasets``
loads (jsonl, json, parquet, csv, a saved dataset folder) with a column mapping. A malformed file ends in one
line naming the file, the line or record, and the problem. Empty and duplicate instructions are reported
and dropped (kept in ``rejected.jsonl``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import UserError
from pipeline.records import Instance, Task
from pipeline.stages.context import StageContext

Format = Literal["auto", "self_instruct", "alpaca", "natural_instructions", "hf"]


# Without ``columns:``, the first of these names a file has is used (and the mapping is logged).
USUAL_NAMES = {"instruction": ("instruction", "prompt", "question", "query"),
               "input": ("input", "context"),
               "output": ("output", "response", "completion", "answer", "target")}


class Columns(BaseModel):
    """Which column holds what; a field left out is recognised by its usual names (``USUAL_NAMES``)."""

    model_config = ConfigDict(extra="forbid")

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    id: str | None = None
    is_classification: str | None = None


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    format: Format = "auto"
    columns: Columns = Field(default_factory=Columns)  # for format: hf (and alpaca-like JSONL)
    split: str = "train"  # for format: hf
    limit: int | None = None
    max_instances: int | None = None  # per task (Super-NaturalInstructions tasks have thousands)
    drop_duplicates: bool = True  # the same instruction and input as an earlier record
    allow_empty_outputs: bool = False  # a file whose every output is empty (a generation stage writes them)


def dependencies(options: Options) -> list[Path]:
    return [Path(options.path)]


def check(options: Options) -> None:
    load_tasks(options)


# ---- reading ------------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: seed file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    if not text.strip():
        raise UserError(f"{path}: empty file, no seed tasks")
    return text.lstrip("\ufeff")


def _str_field(rec: dict, key: str, where: str, required: bool = True) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise UserError(f"{where}: record has no '{key}'")
        return ""
    val = rec[key]
    if not isinstance(val, str):
        shown = json.dumps(val)[:40] if isinstance(val, (int, float, bool, list, dict)) else type(val).__name__
        raise UserError(f"{where}: '{key}' must be a string, got {type(val).__name__} ({shown})")
    return val


def _self_instruct_record(rec: Any, where: str, index: int, source: str) -> Task:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    instruction = _str_field(rec, "instruction", where)
    raw = rec.get("instances", [])
    if not isinstance(raw, list):
        raise UserError(f"{where}: 'instances' must be a list, got {type(raw).__name__}")
    instances = []
    for j, inst in enumerate(raw):
        if not isinstance(inst, dict):
            raise UserError(f"{where}: instances[{j}] must be an object with input/output")
        instances.append(Instance(input=_str_field(inst, "input", f"{where}: instances[{j}]", required=False),
                                  output=_str_field(inst, "output", f"{where}: instances[{j}]", required=False)))
    is_cls = rec.get("is_classification")
    if is_cls is not None and not isinstance(is_cls, bool):
        raise UserError(f"{where}: 'is_classification' must be true or false")
    return Task(id=str(rec.get("id") or f"seed_task_{index}"), name=rec.get("name"), instruction=instruction,
                instances=instances, is_classification=is_cls, source=source)


def resolve_columns(path: Path, available: list[str], cols: Columns) -> Columns:
    """The columns to read: each one configured must be in the file; the others by their usual names."""
    there = set(available)
    shown = ", ".join(available) or "none"
    resolved = {}
    for field, value in cols.model_dump().items():
        if value is not None and value not in there:
            raise UserError(f"{path}: no column '{value}' for the {field.replace('_', ' ')} (columns: {shown}); "
                            f"set stages.seeds.columns.{field}")
        if value is None and field in USUAL_NAMES:
            value = next((name for name in USUAL_NAMES[field] if name in there), None)
        resolved[field] = value
    if resolved["instruction"] is None:
        raise UserError(f"{path}: no instruction column (columns: {shown}; recognised: "
                        f"{', '.join(USUAL_NAMES['instruction'])}); set stages.seeds.columns.instruction")
    return Columns(**resolved)


def _columns_of(path: Path, records: list[Any], cols: Columns) -> Columns:
    """The columns of a list of JSON records (every key any record has)."""
    keys: dict[str, None] = {}
    for rec in records:
        if isinstance(rec, dict):
            keys.update(dict.fromkeys(rec))
    return resolve_columns(path, list(keys), cols)


def _alpaca_record(rec: Any, where: str, index: int, source: str, cols: Columns) -> Task:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    assert cols.instruction is not None  # resolve_columns makes sure
    instruction = _str_field(rec, cols.instruction, where)
    inp = _str_field(rec, cols.input, where, required=False) if cols.input else ""
    out = _str_field(rec, cols.output, where, required=False) if cols.output else ""
    inp, out = inp or "", out or ""
    rid = str(rec[cols.id]) if cols.id and rec.get(cols.id) is not None else f"record_{index}"
    is_cls = rec.get(cols.is_classification) if cols.is_classification else None
    if isinstance(is_cls, str) and is_cls.strip().lower() in ("true", "false"):  # a CSV cell
        is_cls = is_cls.strip().lower() == "true"
    if is_cls is not None and not isinstance(is_cls, bool):
        raise UserError(f"{where}: '{cols.is_classification}' must be true or false, got {type(is_cls).__name__}")
    return Task(id=rid, instruction=instruction, instances=[Instance(input=inp, output=out)],
                is_classification=is_cls, source=source)


def _jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None


def _json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _natural_instructions(path: Path, data: dict, options: Options) -> list[Task]:
    definition = data.get("Definition")
    if isinstance(definition, list):
        definition = definition[0] if definition else None
    if not isinstance(definition, str) or not definition.strip():
        raise UserError(f"{path}: Super-NaturalInstructions task has no 'Definition'")
    raw = data.get("Instances", [])
    if not isinstance(raw, list):
        raise UserError(f"{path}: 'Instances' must be a list")
    instances, outputs = [], []
    for j, inst in enumerate(raw[: options.max_instances] if options.max_instances else raw):
        if not isinstance(inst, dict) or "input" not in inst:
            raise UserError(f"{path}: Instances[{j}] must be an object with input and output")
        out = inst.get("output", "")
        out = out[0] if isinstance(out, list) and out else (out if isinstance(out, str) else "")
        instances.append(Instance(input=str(inst["input"]), output=out))
        outputs.append(out)
    # A task whose answers come from a small label set is a classification task.
    labels = set(outputs)
    is_cls = bool(outputs) and len(labels) <= max(2, len(outputs) // 10) if len(outputs) >= 4 else None
    return [Task(id=path.stem, name=path.stem, instruction=definition, instances=instances,
                 is_classification=is_cls, source=f"seed:{path}")]


def _hf(path: Path, options: Options) -> tuple[list[Task], Columns]:
    import datasets

    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
            if builder is None:
                raise UserError(f"{path}: unsupported file type '{suffix}' (jsonl, json, parquet, csv or a saved dataset)")
            kwargs = {}
            if builder == "csv":
                # CSV cells are text: no numeric or NaN inference (an input "4" must not become 4.0).
                with open(path, newline="", encoding="utf-8") as f:
                    header = next(csv.reader(f), [])
                kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in header})
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise UserError(f"{path}: cannot load as a dataset: {str(e).splitlines()[0]}") from None
    if isinstance(ds, datasets.DatasetDict):
        if options.split not in ds:
            raise UserError(f"{path}: no split '{options.split}' (splits: {', '.join(ds)})")
        ds = ds[options.split]
    cols = resolve_columns(path, ds.column_names, options.columns)
    return [_alpaca_record(rec, f"{path}: record {i}", i, f"seed:{path}", cols) for i, rec in enumerate(ds)], cols


def detect_format(path: Path, text: str | None) -> str:
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".parquet", ".csv"):
        return "hf"
    assert text is not None
    if suffix == ".jsonl":
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        try:
            rec = json.loads(first)
        except json.JSONDecodeError:
            return "self_instruct"  # the line-by-line reader reports the error with its line number
        return "self_instruct" if isinstance(rec, dict) and "instances" in rec else "alpaca"
    stripped = text.lstrip()
    if stripped.startswith("["):
        return "alpaca"
    if stripped.startswith("{"):
        return "natural_instructions" if '"Definition"' in text else "self_instruct"
    return "self_instruct"


def load_tasks(options: Options) -> list[Task]:
    return load(options)[0]


def load(options: Options) -> tuple[list[Task], Columns | None]:
    """The file's tasks and the columns read (None for formats without columns)."""
    path = Path(options.path)
    text = None
    if not path.is_dir():
        if path.suffix.lower() not in (".parquet", ".csv"):
            text = _read_text(path)
        elif not path.exists():
            raise UserError(f"{path}: seed file not found")
    elif not path.exists():
        raise UserError(f"{path}: seed file not found")
    fmt = options.format if options.format != "auto" else detect_format(path, text)
    source = f"seed:{path}"
    cols = None
    if fmt == "hf":
        tasks, cols = _hf(path, options)
    elif fmt == "natural_instructions":
        data = _json(path, text or "")
        if not isinstance(data, dict):
            raise UserError(f"{path}: a Super-NaturalInstructions task file is one JSON object")
        tasks = _natural_instructions(path, data, options)
    elif fmt == "alpaca" and path.suffix.lower() != ".jsonl":
        data = _json(path, text or "")
        if not isinstance(data, list):
            raise UserError(f"{path}: Alpaca data must be a JSON list of records")
        cols = _columns_of(path, data, options.columns)
        tasks = [_alpaca_record(rec, f"{path}: record {i}", i, source, cols) for i, rec in enumerate(data)]
    elif fmt == "alpaca":
        lines = list(_jsonl(path, text or ""))
        cols = _columns_of(path, [rec for _, rec in lines], options.columns)
        tasks = [_alpaca_record(rec, f"{path}:{n}", i, source, cols) for i, (n, rec) in enumerate(lines)]
    else:
        tasks = [_self_instruct_record(rec, f"{path}:{n}", i, source)
                 for i, (n, rec) in enumerate(_jsonl(path, text or ""))]
    if not tasks:
        raise UserError(f"{path}: no seed tasks found")
    if options.max_instances:
        for t in tasks:
            t.instances = t.instances[: options.max_instances]
    tasks = tasks[: options.limit] if options.limit else tasks
    if not options.allow_empty_outputs:
        _check_outputs(path, tasks, cols)
    return tasks, cols


def _check_outputs(path: Path, tasks: list[Task], cols: Columns | None) -> None:
    """A file whose records all have instances with empty outputs is read wrong (or is instructions only)."""
    instances = [i for t in tasks for i in t.instances]
    if not instances or any(i.output.strip() for i in instances):
        return
    if cols is not None and cols.output is None:
        where = f"no output column (recognised: {', '.join(USUAL_NAMES['output'])})"
    elif cols is not None:
        where = f"column '{cols.output}' is empty in every record"
    else:
        where = "every instance's output is empty"
    raise UserError(f"{path}: {where}; set stages.seeds.columns.output to the answers' column, or "
                    f"stages.seeds.allow_empty_outputs: true when a generation stage writes the outputs")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def run(ctx: StageContext) -> None:
    options: Options = ctx.options
    tasks, cols = load(options)
    if cols is not None:
        ctx.log.info("%s: columns read: %s", options.path, ", ".join(f"{k}={v!r}" for k, v in cols.model_dump().items()
                                                             if v is not None))
        ctx.stats.metrics["columns"] = {k: v for k, v in cols.model_dump().items() if v is not None}
    ctx.stats.rows_in = len(tasks)
    kept: list[Task] = []
    seen: dict[str, str] = {}
    duplicates = 0
    for t in tasks:
        if not t.instruction.strip():
            ctx.reject(t, "empty_instruction", "the instruction is empty")
            continue
        # Records that share an instruction and differ in input are different tasks (Alpaca's "Classify the
        # sentiment of the review" with two reviews): a duplicate repeats both.
        key = _norm("\n".join([t.instruction] + [i.input for i in t.instances]))
        if key in seen:
            duplicates += 1
            if options.drop_duplicates:
                ctx.reject(t, "duplicate_record", f"same instruction and input as {seen[key]}")
                continue
        seen.setdefault(key, t.id)
        kept.append(t)
    if duplicates:
        ctx.log.warning("%d seed records repeat an earlier one's instruction and input: %s", duplicates,
                        "dropped (each, with the record it repeats, in rejected.jsonl)" if options.drop_duplicates
                        else "kept (drop_duplicates: false)")
    ctx.write_records(kept)
    ctx.stats.metrics.update({
        "tasks": len(kept),
        "classification": sum(1 for t in kept if t.is_classification),
        "with_input": sum(1 for t in kept if any(i.input.strip() for i in t.instances)),
        "instances": sum(len(t.instances) for t in kept),
    })
