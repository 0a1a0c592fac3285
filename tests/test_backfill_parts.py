"""The backfill's parts that need no cluster: path lists, the resume rule, the findings table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePath

import pytest

from cxr_edge.errors import CxrEdgeError
from cxr_edge.path_lists import items_from_lists
from cxr_edge.records import FindingsRecord
from cxr_edge.resume import CompletedOutputs
from cxr_edge.sources import InputItem

from .conftest import SAMPLES


def test_path_lists_name_outputs_by_the_entry_alone(tmp_path):
    root = tmp_path / "archive"
    (tmp_path / "elsewhere").mkdir()
    listing = root / "exports" / "list.csv"
    listing.parent.mkdir(parents=True)
    listing.write_text("id,path\n1,a/x.dcm\n2,a/./x.dcm\n3,\n4,b/../c/y.png\n5,/abs/z.dcm\n6,../elsewhere/w.png\n")
    items, left_out = items_from_lists([listing], root=root)
    assert left_out == 2  # the repeated file (a/./x.dcm is a/x.dcm) and the blank row
    assert [(str(i.path), i.relative.as_posix()) for i in items] == [
        (str(root / "a" / "x.dcm"), "a/x.dcm"),
        (str(root / "c" / "y.png"), "c/y.png"),  # relative entries start at --root
        ("/abs/z.dcm", "abs/z.dcm"),  # outside the root: the absolute path without its `/`
        (str(tmp_path / "elsewhere" / "w.png"), (tmp_path / "elsewhere" / "w.png").as_posix().lstrip("/")),
    ]
    # without --root, the list's folder is the root
    items, _ = items_from_lists([listing])
    assert items[0].path == listing.parent / "a" / "x.dcm" and items[0].relative == PurePath("a/x.dcm")
    assert items[3].path == root / "elsewhere" / "w.png"  # outside exports/: named by its absolute path
    assert items[3].relative == PurePath(*items[3].path.parts[1:])


def test_path_lists_refuse_what_they_cannot_read(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("file\nx.dcm\n")
    with pytest.raises(CxrEdgeError, match="no column 'path'.*--path-column"):
        items_from_lists([listing])
    assert [i.relative.as_posix() for i in items_from_lists([listing], column="file")[0]] == ["x.dcm"]
    with pytest.raises(CxrEdgeError, match="path list not found"):
        items_from_lists([tmp_path / "absent.csv"])
    (tmp_path / "bad.csv").write_bytes(b"path\n\xff\xfe\n")
    with pytest.raises(CxrEdgeError, match="cannot read the path list"):
        items_from_lists([tmp_path / "bad.csv"])


def test_parquet_path_lists(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the ray extra brings pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"accession": ["1", "2"], "file": ["p/one.png", None]}), tmp_path / "list.parquet")
    items, left_out = items_from_lists([tmp_path / "list.parquet"], column="file")
    assert [i.relative.as_posix() for i in items] == ["p/one.png"] and left_out == 1
    with pytest.raises(CxrEdgeError, match="no column 'path'"):
        items_from_lists([tmp_path / "list.parquet"])


def _record(tmp_path, **changes) -> tuple[CompletedOutputs, InputItem, dict]:
    """A finished input's record on disk (as the pipeline writes it) and the rule that reads it."""
    from cxr_edge.infer_run import plan, run
    from cxr_edge.pipeline import RunSettings

    source = tmp_path / "rsna.dcm"
    shutil.copy(SAMPLES / "dicom" / "rsna_cr_pa_jpeg_baseline_mono2.dcm", source)
    out = tmp_path / "out"
    settings = RunSettings(workers=1, threads=1, heatmaps=False)
    items, skipped, package, selection = plan([str(source)], out, settings)
    done = run(items, skipped, package, selection, out, settings)
    record = done.results[0].record
    rule = CompletedOutputs(out, done.model, write_sr=True, heatmaps=False)
    return rule, items[0], record


def test_the_resume_rule(tmp_path):
    rule, item, record = _record(tmp_path)
    sha = record.input_sha256
    assert isinstance(rule(item, sha), FindingsRecord)
    assert rule(item, "0" * 64) is None  # other bytes
    assert CompletedOutputs(rule.out_dir, {**rule.model, "sha256": "1" * 64}, True, False)(item, sha) is None
    assert CompletedOutputs(rule.out_dir, rule.model, True, True)(item, sha) is None  # heatmaps asked for now
    Path(record.sr["path"]).unlink()
    assert rule(item, sha) is None  # a file the record names is gone
    path = rule.record_path(item)
    data = json.loads(path.read_text())
    data.pop("outputs")
    data.update(status="error", error={"stage": "decode", "reason": "x", "kind": "permanent"})
    path.write_text(json.dumps(data))
    assert rule(item, sha) is not None  # the same bytes fail the same way
    data["error"]["kind"] = "transient"
    path.write_text(json.dumps(data))
    assert rule(item, sha) is None  # a full disk may be gone now
    path.write_text("{not json")
    assert rule(item, sha) is None


def test_the_findings_table_keeps_one_row_per_input(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="the ray extra brings pyarrow")
    import pyarrow.parquet as pq

    from cxr_edge.findings_table import schema, table_row, write_table
    from cxr_edge.labels import LABELS

    rule, item, record = _record(tmp_path)
    first = table_row(record, "a.json", list(LABELS), False)
    again = dict(first, from_earlier_run=True)  # a block Ray ran twice
    other = dict(first, relative_path="0-first.dcm")
    batches = [pa.Table.from_pylist([first, other], schema=schema(list(LABELS))),
               pa.Table.from_pylist([again], schema=schema(list(LABELS)))]
    assert write_table(tmp_path / "t.parquet", batches, list(LABELS)) == 2
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert [r["relative_path"] for r in rows] == ["0-first.dcm", record.input["relative_path"]]
    assert rows[1]["from_earlier_run"] is True  # the last one seen
    assert rows[1]["No Finding"] == record.no_finding.as_dict()["probability"]
    assert rows[1]["sop_instance_uid"] == record.dicom["sop_instance_uid"]


def test_a_node_with_another_model_package_is_refused(tmp_path):
    """The records name the driver's model: a node whose package differs (an older install) stops the run."""
    from cxr_edge.backfill import StageContext, _same_package
    from cxr_edge.manifest import ModelPackage

    package = ModelPackage.load()
    model = package.describe(package.artifact("fp32").sha256)

    def context(model: dict) -> StageContext:
        return StageContext(tmp_path, None, "onnxruntime", "fp32", "fp32", package.preprocess_params, 1, 1, 0, True,
                            False, 1, CompletedOutputs(tmp_path, model, True, False))

    assert _same_package(context(model)).version == package.version
    with pytest.raises(CxrEdgeError, match="is not the driver's"):
        _same_package(context({**model, "version": "0.0.1"}))
