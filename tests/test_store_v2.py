"""Format version 2: several (curvature, block) results per checkpoint, typed reading, resume with missing results,
merge, and version-1 files (read, appended to as version 1, never upgraded unless asked, `upgrade`)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from hessspec.cli import cli
from hessspec.results import CheckpointResult
from hessspec.store import ResultWriter, StoreError, convert, load_results, merge, summary, upgrade
from tests.test_store import CONFIG, assert_same_result, make_result, write_run

KINDS = (("hessian", "all"), ("hessian", "layer1"), ("hessian", "layer2"), ("ggn", "all"), ("residual", "layer1"))


def kind_results(step: int, kinds=KINDS) -> list[CheckpointResult]:
    """Results of one checkpoint, one per kind, with numbers that differ between kinds."""
    out = []
    for i, (curvature, block) in enumerate(kinds):
        base = make_result(step, seed=1000 * step + i, sha256=make_result(step).sha256)
        out.append(dataclasses.replace(base, curvature=curvature, block=block, n_params=100 + i))
    return out


def write_kinds(path, steps, kinds=KINDS) -> dict:
    written = {}
    with ResultWriter(path, label="kinds", config=CONFIG) as writer:
        for step in steps:
            results = kind_results(step, kinds)
            writer.write(results)
            written.update({(r.step, *r.kind): r for r in results})
    return written


def test_round_trip_several_curvatures_and_blocks(tmp_path):
    path = tmp_path / "run.h5"
    written = write_kinds(path, [200, 0, 100])
    run = load_results(path)
    assert run.format_version == 2
    assert len(run.results) == 15
    for result in run.results:
        assert_same_result(result, written[(result.step, *result.kind)])
    assert run.curvatures == ("hessian", "ggn", "residual")
    assert run.blocks == ("all", "layer1", "layer2")
    assert run.kinds == KINDS
    assert [r.kind for r in run.results[:5]] == list(KINDS)  # Hessian first, "all" first, blocks as stored
    assert run.available_steps() == (0, 100, 200)
    assert run.available_steps("residual", "layer1") == (0, 100, 200)
    assert run.available_steps("residual", "layer2") == ()
    # The classic view is unchanged: checkpoints and steps are the whole-model Hessian.
    assert [c.kind for c in run.checkpoints] == [("hessian", "all")] * 3
    assert run.steps == (0, 100, 200)
    got = run.get(100, curvature="ggn", block="all")
    assert_same_result(got, written[(100, "ggn", "all")])
    assert [r.step for r in run.select("hessian", "layer2")] == [0, 100, 200]
    with pytest.raises(KeyError, match=r"ggn/layer2 is not in .*available: \['hessian/all'"):
        run.get(100, curvature="ggn", block="layer2")
    with pytest.raises(KeyError, match=r"step 7 is not in .* for ggn/all; available steps: \[0, 100, 200\]"):
        run.get(7, curvature="ggn")
    assert "curvatures=['hessian', 'ggn', 'residual']" in repr(run) and "nodes" not in repr(run)


def test_block_names_are_free_text(tmp_path):
    path = tmp_path / "run.h5"
    kinds = (("hessian", "features.0/conv.weight"), ("hessian", "ünï cödé"), ("empirical-fisher", "all"))
    write_kinds(path, [0], kinds)
    assert load_results(path).kinds == (("hessian", "features.0/conv.weight"), ("hessian", "ünï cödé"),
                                        ("empirical-fisher", "all"))  # fmt: skip


def test_missing_results_are_work_to_do_and_are_added_to_the_checkpoint(tmp_path):
    path = tmp_path / "run.h5"
    whole, ggn, block = kind_results(0, KINDS[:1] + KINDS[3:4] + KINDS[1:2])
    sha = whole.sha256
    with ResultWriter(path, label="x", config=CONFIG) as writer:
        assert writer.missing(0, sha, KINDS[:2]) == KINDS[:2]
        assert writer.write(whole) == "step_00000000"
    with ResultWriter(path, label=None, config=CONFIG) as writer:  # a later run wants more
        assert writer.stored(0, sha) == {("hessian", "all")}
        assert writer.missing(0, sha, [("hessian", "all"), ("ggn", "all"), ("hessian", "layer1")]) == (
            ("ggn", "all"),
            ("hessian", "layer1"),
        )
        assert writer.write([ggn]) == "step_00000000"
        with pytest.raises(StoreError, match=r"step 0 \(00000000\) hessian/all is already stored"):
            writer.write([block, whole])
        writer.write(block)
        assert writer.missing(0, sha, KINDS[:2] + KINDS[3:4]) == ()
        assert writer.has(0, sha, "ggn", "all") and not writer.has(0, sha, "ggn", "layer1")
    run = load_results(path)
    assert {r.kind for r in run.results} == {("hessian", "all"), ("ggn", "all"), ("hessian", "layer1")}
    for stored, original in zip(run.results, [whole, block, ggn], strict=True):
        assert_same_result(stored, original)
    assert sorted(p.name for p in (tmp_path / "run.h5.d").iterdir()) == ["step_00000000.h5"]
    # force replaces one result and keeps the others.
    new_ggn = dataclasses.replace(ggn, loss=42.0)
    with ResultWriter(path, label=None, config=CONFIG, force=True) as writer:
        writer.write(new_ggn)
    run = load_results(path)
    assert run.get(0, curvature="ggn").loss == 42.0
    assert_same_result(run.get(0), whole)
    assert_same_result(run.get(0, block="layer1"), block)


def test_a_forced_config_change_makes_every_kind_stale_until_rewritten(tmp_path):
    path = tmp_path / "run.h5"
    write_kinds(path, [0, 1], KINDS[:2])
    new_config = {**CONFIG, "probes": 4}
    with ResultWriter(path, label=None, config=new_config, force=True) as writer:
        sha = make_result(0).sha256
        assert writer.missing(0, sha, KINDS[:2]) == KINDS[:2]
        writer.write(dataclasses.replace(kind_results(0, KINDS[:1])[0], probes=4, nodes=np.ones((4, 12)),
                                         weights=np.full((4, 12), 1 / 12)))  # fmt: skip
        assert writer.missing(0, sha, KINDS[:2]) == KINDS[1:2]  # the other kind of step 0 is still stale
    assert load_results(path).stale_steps == (0, 1)


def test_results_written_together_must_be_one_checkpoint_each_kind_once(tmp_path):
    a, b = kind_results(0, KINDS[:2])
    with ResultWriter(tmp_path / "run.h5", label="x", config=CONFIG) as writer:
        with pytest.raises(ValueError, match="must be of one checkpoint"):
            writer.write([a, make_result(1)])
        with pytest.raises(ValueError, match="two results for hessian/layer1 of step 0"):
            writer.write([a, b, b])
        with pytest.raises(ValueError, match="block must be a non-empty string"):
            writer.write(dataclasses.replace(a, block=""))
        with pytest.raises(ValueError, match="nothing to write"):
            writer.write([])
    assert load_results(tmp_path / "run.h5").results == ()


def test_a_leftover_checkpoints_directory_is_not_adopted(tmp_path):
    write_run(tmp_path / "run.h5", [0])
    (tmp_path / "run.h5").unlink()  # the root file deleted alone
    with pytest.raises(StoreError, match=r"run.h5.d exists and holds checkpoint files without their result file"):
        ResultWriter(tmp_path / "run.h5", label="x", config=CONFIG)
    assert not (tmp_path / "run.h5").exists()


def test_a_foreign_file_in_the_checkpoints_directory_is_refused(tmp_path):
    path = tmp_path / "run.h5"
    write_run(path, [0])
    with h5py.File(tmp_path / "run.h5.d" / "step_00000009.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="step_00000009.h5 is not a hessspec checkpoint file"):
        load_results(path)


# --------------------------------------------------------------------------------------------------------------
# Version 1


def _v1_by_hand(path, steps) -> list[CheckpointResult]:
    """A version-1 file written with plain h5py from docs/FORMAT.md (not with hessspec's writer)."""
    results = [make_result(step) for step in steps]
    with h5py.File(path, "w") as f:
        f.attrs.update(format="hessspec", format_version=np.int64(1), generated_by="hessspec 0.1.0",
                       created="2025-01-01T00:00:00+00:00", label="old", config=json.dumps(CONFIG))  # fmt: skip
        for r in results:
            g = f.create_group(f"checkpoints/step_{r.step:08d}")
            for name in ("step", "n_params", "n_samples", "seed", "lanczos_steps", "probes"):
                g.attrs[name] = np.int64(getattr(r, name))
            for name in ("loss", "grad_norm", "trace", "trace_stderr", "elapsed_s"):
                g.attrs[name] = np.float64(getattr(r, name))
            for name in ("source", "sha256", "model", "bn_mode", "dtype", "device"):
                g.attrs[name] = getattr(r, name)
            g.attrs["timings"], g.attrs["settings"] = json.dumps(r.timings), json.dumps(r.settings)
            for member, field in [("slq/nodes", "nodes"), ("slq/weights", "weights"),
                                  ("top/eigenvalues", "top_eigenvalues"), ("top/residuals", "top_residuals"),
                                  ("overlap/k", "overlap_k"), ("overlap/ratio", "overlap_ratio"),
                                  ("overlap/cos2", "cos2"), ("gradient/nodes", "gradient_nodes"),
                                  ("gradient/weights", "gradient_weights")]:  # fmt: skip
                g[member] = getattr(r, field)
            g.attrs["complete"] = True
    return results


def test_a_version_1_file_written_by_hand_reads_as_hessian_of_all(tmp_path):
    path = tmp_path / "old.h5"
    results = _v1_by_hand(path, [0, 10])
    run = load_results(path)
    assert run.format_version == 1 and run.label == "old"
    assert run.kinds == (("hessian", "all"),)
    for stored, original in zip(run.checkpoints, results, strict=True):
        assert_same_result(stored, original)


def test_a_version_1_file_is_never_upgraded_unless_asked(tmp_path):
    path = tmp_path / "old.h5"
    _v1_by_hand(path, [0])
    # Resuming with whole-model Hessian results keeps writing version 1.
    with ResultWriter(path, label=None, config=CONFIG) as writer:
        assert writer.format_version == 1
        writer.write(make_result(5))
        before = path.read_bytes()
        other = dataclasses.replace(make_result(6), curvature="ggn")
        with pytest.raises(StoreError, match=r"old.h5 is a format-version-1 file, .* \(not ggn/all\); convert it "
                                             r"with `hessspec upgrade .*old.h5`") as info:  # fmt: skip
            writer.write([make_result(6), other])
        assert "\n" not in str(info.value)
        with pytest.raises(StoreError, match="format-version-1"):
            writer.check_kinds([("hessian", "all"), ("hessian", "layer1")])
        writer.check_kinds([("hessian", "all")])
        assert path.read_bytes() == before
    run = load_results(path)
    assert run.format_version == 1 and run.steps == (0, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.h5"]
    with pytest.raises(StoreError, match="has format version 1, not 2; convert it with `hessspec upgrade"):
        ResultWriter(path, label=None, config=CONFIG, format_version=2)
    # Merging per-block results into it is refused the same way, before anything is written.
    write_kinds(tmp_path / "blocks.h5", [0], KINDS[:2])
    with pytest.raises(StoreError, match="format-version-1 file"):
        merge(path, [tmp_path / "blocks.h5"])
    assert path.read_bytes() == before


def test_upgrade_converts_in_place_and_keeps_every_result(tmp_path):
    path = tmp_path / "old.h5"
    write_run(path, [0, 10], format_version=1)
    with ResultWriter(path, label=None, config={**CONFIG, "probes": 4}, force=True):
        pass  # both entries are now stale
    original = load_results(path)
    assert upgrade(path) == 2
    run = load_results(path)
    assert run.format_version == 2 and run.label == original.label and run.config == original.config
    assert run.created == original.created and run.stale_steps == (0, 10)
    for a, b in zip(original.checkpoints, run.checkpoints, strict=True):
        assert_same_result(a, b)
    with h5py.File(path, "r") as f:
        assert f.attrs["upgraded_by"].startswith("hessspec ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.h5", "old.h5.d"]
    with pytest.raises(StoreError, match="already format version 2"):
        upgrade(path)


def test_an_interrupted_upgrade_leaves_the_version_1_file(tmp_path, monkeypatch):
    path = tmp_path / "old.h5"
    written = write_run(path, [0, 10], format_version=1)

    def die(*args):
        raise KeyboardInterrupt  # killed between renaming the directory and replacing the root file

    with monkeypatch.context() as m:
        m.setattr(convert.os, "replace", die)
        with pytest.raises(KeyboardInterrupt):
            upgrade(path)
    run = load_results(path)
    assert run.format_version == 1 and run.steps == (0, 10)
    with ResultWriter(path, label=None, config=CONFIG) as writer:  # still a working version-1 file
        writer.write(make_result(20))
    assert upgrade(path) == 3  # the directory left behind is replaced
    run = load_results(path)
    assert run.format_version == 2 and run.steps == (0, 10, 20)
    assert_same_result(run.get(10), written[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.h5", "old.h5.d"]


# --------------------------------------------------------------------------------------------------------------
# Merge


def test_merge_completes_checkpoints_from_files_with_different_kinds(tmp_path):
    whole = write_kinds(tmp_path / "whole.h5", [0, 1], KINDS[:1])
    blocks = write_kinds(tmp_path / "blocks.h5", [1, 2], KINDS[:3])  # step 1's Hessian of all again, same numbers
    out = tmp_path / "merged.h5"
    keys = merge(out, [tmp_path / "whole.h5", tmp_path / "blocks.h5"])
    assert keys == ("step_00000000", "step_00000001", "step_00000002")
    run = load_results(out)
    assert {(r.step, *r.kind) for r in run.results} == set(whole) | set(blocks)
    assert merge(out, [tmp_path / "whole.h5", tmp_path / "blocks.h5"]) == ()
    # A version-1 input goes into a new version-2 file: the way to convert and keep the old file.
    write_run(tmp_path / "old.h5", [7], format_version=1)
    merge(tmp_path / "copy.h5", [tmp_path / "old.h5"])
    assert load_results(tmp_path / "copy.h5").format_version == 2
    assert load_results(tmp_path / "old.h5").format_version == 1


def test_merge_names_the_kind_of_a_conflict(tmp_path):
    write_kinds(tmp_path / "a.h5", [0], KINDS[:2])
    changed = [dataclasses.replace(r, loss=9.0) if r.block == "layer1" else r for r in kind_results(0, KINDS[:2])]
    with ResultWriter(tmp_path / "b.h5", label="kinds", config=CONFIG) as writer:
        writer.write(changed)
    with pytest.raises(StoreError, match=r"step 0 \(00000000\) hessian/layer1 differs between .* in loss"):
        merge(tmp_path / "m.h5", [tmp_path / "a.h5", tmp_path / "b.h5"])


# --------------------------------------------------------------------------------------------------------------
# info, export, upgrade on the command line


def test_info_and_export_show_curvature_and_block(tmp_path):
    path = tmp_path / "run.h5"
    write_kinds(path, [0, 100])
    runner = CliRunner()
    result = runner.invoke(cli, ["info", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "checkpoints: 2" in lines
    assert "curvatures:  hessian, ggn, residual" in lines and "blocks:      all, layer1, layer2" in lines
    header = next(line for line in lines if line.split()[:4] == ["step", "source", "curvature", "block"])
    rows = lines[lines.index(header) + 2 :]
    rows = rows[: rows.index("")]  # the legend follows the table
    run = load_results(path)
    source = os.path.basename(run.results[0].source) or "-"
    assert [row.split()[:4] for row in rows[:5]] == [["0", source, *kind] for kind in KINDS]
    assert len(rows) == 10

    out = runner.invoke(cli, ["export", str(path), "--format", "csv"])
    assert out.exit_code == 0, out.output
    table = list(csv.DictReader(io.StringIO(out.output)))
    assert list(table[0])[:5] == ["step", "source", "curvature", "block", "loss"]
    for row, r in zip(table, run.results, strict=True):
        assert (int(row["step"]), row["curvature"], row["block"]) == (r.step, *r.kind)
        assert float(row["lambda_1"]) == r.top_eigenvalues[0]
    document = json.loads(runner.invoke(cli, ["export", str(path), "--format", "json"]).output)
    assert document["curvatures"] == ["hessian", "ggn", "residual"]
    assert [(c["curvature"], c["block"]) for c in document["checkpoints"][:5]] == list(KINDS)
    assert summary.summary_table(run)[3]["trace"] == run.get(0, curvature="ggn").trace


def test_info_of_a_whole_model_file_has_no_kind_columns(tmp_path):
    write_run(tmp_path / "run.h5", [0])
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "run.h5")])
    assert result.exit_code == 0 and "curvature" not in result.output


def test_upgrade_command(tmp_path):
    path = tmp_path / "old.h5"
    write_run(path, [0, 1], format_version=1)
    runner = CliRunner()
    result = runner.invoke(cli, ["upgrade", str(path)])
    assert result.exit_code == 0, result.output
    assert f"upgraded {path} to format version 2: 2 checkpoint(s)" in result.output
    again = runner.invoke(cli, ["upgrade", str(path)])
    assert again.exit_code != 0 and "Error: " in again.output and "already format version 2" in again.output
