"""`pneumofed prepare` against what a new user, a tired hospital IT person or an attacker hands it."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from test_prepare import COLUMNS, cli, count_decodes, file_states, good_row, rejected, run_site, write_csv, write_dicom

from pneumofed.common.data import prepare
from pneumofed.common.data.store import INDEX_FILE, LOCK_FILE, RoiStore, store_write_lock


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """As in test_prepare: one usable file, good.dcm; `cli` and `run_site` expect this layout."""
    write_dicom(tmp_path / "dicom" / "good.dcm")
    return tmp_path


def summary_and_error(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# 1. an image its Modality LUT leaves without contrast


def test_a_modality_lut_that_flattens_the_image_is_rejected_not_stored_blank(site: Path, capsys) -> None:
    ds = pydicom.dcmread(write_dicom(site / "dicom" / "flat.dcm", patient_id="PID-2"))
    ds.RescaleSlope, ds.RescaleIntercept = 0, 100  # every pixel becomes 100
    ds.save_as(site / "dicom" / "flat.dcm")
    write_csv(site / "annotations.csv", [good_row("good.dcm"), good_row("flat.dcm", "emphysema")])
    assert cli(site) == 0
    out, _ = summary_and_error(capsys)
    assert "rejected 1: 1 blank-image" in out
    saved = json.loads((site / "store" / "rejects.json").read_text())
    assert [(r["reason"], r["file"], r["row"]) for r in saved["rejects"]] == [("blank-image", "flat.dcm", 3)]
    assert "no contrast" in saved["rejects"][0]["detail"]
    assert RoiStore.open(site / "store").class_counts() == {"nodule": 1, "interstitial": 0, "emphysema": 0}


# ---------------------------------------------------------------------------------------------
# 2. symlink loops, broken links and unreadable folders inside --dicom-dir


def test_scan_survives_symlink_loops_and_unreadable_folders(site: Path, monkeypatch, capsys) -> None:
    dicom = site / "dicom"
    write_dicom(dicom / "series" / "IM0002", patient_id="PID-2")
    (dicom / "loop-a").symlink_to("loop-b")
    (dicom / "loop-b").symlink_to("loop-a")
    (dicom / "series" / "up").symlink_to("..")  # following it would never end
    (dicom / "gone.dcm").symlink_to("deleted-meanwhile.dcm")
    outside = site / "elsewhere"
    write_dicom(outside / "IM0003", patient_id="PID-3")
    (dicom / "mounted").symlink_to(outside)
    (dicom / "alias.dcm").symlink_to("series/IM0002")  # a link to a file is followed
    locked = dicom / "locked"
    write_dicom(locked / "IM0004", patient_id="PID-4")
    locked.chmod(0)
    if os.geteuid() == 0:  # root lists anything: refuse the listing as the kernel does for everyone else
        real_scandir = os.scandir

        def scandir(path: object = ".") -> object:
            if Path(os.fsdecode(path)) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        write_csv(site / "annotations.csv", [good_row("good.dcm"), good_row("series/IM0002", "interstitial"),
                                             good_row("loop-a")])
        assert cli(site) == 0
    finally:
        locked.chmod(0o755)
    out, err = summary_and_error(capsys)
    assert "Traceback" not in err and out.startswith("prepared 2 ROIs from 2 files")
    report = json.loads((site / "store" / "rejects.json").read_text())
    assert sorted((r["reason"], r["file"], r["row"]) for r in report["rejects"]) == [
        ("broken-symlink", "gone.dcm", None),
        ("missing-file", "dicom/loop-a", 4),
        ("symlink-loop", "loop-a", None),
        ("symlink-loop", "loop-b", None),
        ("symlink-loop", "series/up", None),
        ("symlinked-folder", "mounted", None),
        ("unreadable-folder", "locked", None),
    ]
    assert all(r["detail"] for r in report["rejects"])
    assert report["unannotated_files"] == []  # alias.dcm is series/IM0002, which is annotated


# ---------------------------------------------------------------------------------------------
# 3. an --out that cannot be a store folder


@pytest.mark.parametrize("where", ["file", "below-a-file", "pixels-is-a-file"])
def test_unusable_out_fails_before_decoding_and_writes_nothing(site: Path, where: str, monkeypatch, capsys) -> None:
    write_csv(site / "annotations.csv", [good_row("good.dcm")])
    (site / "notes.txt").write_text("the store was meant to go elsewhere\n")
    out = {"file": site / "notes.txt", "below-a-file": site / "notes.txt" / "store", "pixels-is-a-file": site / "store"}[where]
    if where == "pixels-is-a-file":
        out.mkdir()
        (out / "pixels").write_text("not a folder")
    before = file_states(site)
    calls = count_decodes(monkeypatch)
    code = cli(site, "--out", str(out))  # the later --out wins
    _, err = summary_and_error(capsys)
    assert code == 2 and sum(calls.values()) == 0
    assert err.startswith("pneumofed prepare: error: --out ") and err.count("\n") == 1 and "Traceback" not in err
    assert file_states(site) == before and not (site / "key").exists()


def test_files_in_the_store_pixels_folder_that_are_not_shards_are_left_alone(site: Path) -> None:
    run_site(site, [])
    foreign = site / "store" / "pixels" / "holiday.jpg"
    foreign.write_bytes(b"\xff\xd8 not ours")
    run_site(site, [])
    assert foreign.read_bytes() == b"\xff\xd8 not ours"


# ---------------------------------------------------------------------------------------------
# 4. Ctrl-C


def pneumofed_command() -> list[str]:
    script = Path(sys.executable).with_name("pneumofed")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pneumofed.common.cli"]


def _default_sigint() -> None:
    """SIGINT at its default in a child about to exec, as a terminal starts a command: tests run as a
    background job inherit SIGINT ignored, and a Python started so keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def workers(pid: int) -> int:
    """How many child processes of `pid` are forks of it (the decoding pool's workers)."""
    try:
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
        return sum(Path(f"/proc/{child}/cmdline").read_bytes() == own
                   for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    except OSError:  # it or a child has just ended
        return 0


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs Linux /proc/<pid>/task/<tid>/children to see the decoding workers")
def test_ctrl_c_during_prepare_prints_one_line_exits_130_and_keeps_the_store(tmp_path: Path) -> None:
    from pneumofed.common.data.synth import write_hospitals

    hospital = write_hospitals(tmp_path / "sites", n_hospitals=1, rois_per_hospital=30, seed=3)[0]
    with (hospital / "annotations.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    (hospital / "first.csv").write_text("\n".join(",".join(row) for row in rows[:4]) + "\n")
    store, secret = tmp_path / "store", tmp_path / "key"
    settings = {"roi_size": 32, "spacing_mm": 0.25}  # 3x upsampling: decoding lasts long enough to interrupt
    first = prepare.prepare_site(hospital / "dicom", hospital / "first.csv", store, secret_path=secret,
                                 workers=1, **settings)
    assert first.rois >= 3
    before = file_states(store / INDEX_FILE, store / "pixels")

    command = [*pneumofed_command(), "prepare", "--dicom-dir", str(hospital / "dicom"),
               "--annotations", str(hospital / "annotations.csv"), "--out", str(store), "--secret-file", str(secret),
               "--roi-size", "32", "--spacing-mm", "0.25", "--workers", "2"]
    # Its own session, so that the SIGINT goes to its process group only, as a terminal's Ctrl-C would.
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           preexec_fn=_default_sigint)  # noqa: PLW1509 - it takes no lock between fork and exec
    try:
        deadline = time.monotonic() + 120
        while workers(run.pid) < 2:  # the two decoding workers exist: decoding has started
            assert run.poll() is None and time.monotonic() < deadline, "prepare ended before it was interrupted"
            time.sleep(0.01)
        os.killpg(run.pid, signal.SIGINT)  # while decoding, or (a fast machine) while storing: both keep the store
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert (run.returncode, err.strip(), out) == (130, "interrupted", ""), err
    assert file_states(store / INDEX_FILE, store / "pixels") == before
    assert len(RoiStore.open(store)) == first.rois
    assert sorted(p.name for p in store.iterdir()) == ["index.json", "pixels", "rejects.json"]  # no lock, no temp file


def test_an_interrupt_while_storing_shards_leaves_no_shard_the_index_does_not_name(tmp_path: Path, monkeypatch) -> None:
    from pneumofed.common.data.synth import write_hospitals

    hospital = write_hospitals(tmp_path / "sites", n_hospitals=1, rois_per_hospital=12, seed=3)[0]
    with (hospital / "annotations.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    (hospital / "first.csv").write_text("\n".join(",".join(row) for row in rows[:3]) + "\n")
    store, secret = tmp_path / "store", tmp_path / "key"
    first = prepare.prepare_site(hospital / "dicom", hospital / "first.csv", store, secret_path=secret, workers=1)
    before = file_states(store / INDEX_FILE, store / "pixels")

    real_write_shard, written = prepare.write_shard, []

    def interrupted_after_two(*args, **kwargs) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write_shard(*args, **kwargs)
        written.append(args[1])

    monkeypatch.setattr(prepare, "write_shard", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_site(hospital / "dicom", hospital / "annotations.csv", store, secret_path=secret, workers=1)
    assert len(written) == 2  # two new shards had been stored when the interrupt came
    assert file_states(store / INDEX_FILE, store / "pixels") == before
    assert len(RoiStore.open(store)) == first.rois


# ---------------------------------------------------------------------------------------------
# 5. two prepare runs into one store


def test_a_second_prepare_into_a_store_being_written_fails_at_once(site: Path, monkeypatch, capsys) -> None:
    write_csv(site / "annotations.csv", [good_row("good.dcm")])
    assert cli(site) == 0
    before = file_states(site / "store")
    calls = count_decodes(monkeypatch)
    with store_write_lock(site / "store"):  # the first run, still writing
        assert cli(site, "--roi-size", "32") == 2
    _, err = summary_and_error(capsys)
    assert str(site / "store") in err and "another `pneumofed prepare`" in err and err.count("\n") == 1
    assert sum(calls.values()) == 0 and file_states(site / "store") == before
    assert cli(site, "--roi-size", "32") == 0  # once the first run is done
    assert not (site / "store" / LOCK_FILE).exists()


def test_the_lock_is_held_against_other_processes_and_released_when_they_end(site: Path, capsys) -> None:
    write_csv(site / "annotations.csv", [good_row("good.dcm")])
    (site / "store").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", ("import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
                                "print('held', flush=True); sys.stdin.read()"), str(site / "store" / LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert cli(site) == 2
        assert "another `pneumofed prepare`" in capsys.readouterr().err
        assert not (site / "store" / INDEX_FILE).exists()
    finally:
        holder.communicate("")  # it exits, and the kernel drops its lock
    assert cli(site) == 0 and len(RoiStore.open(site / "store")) == 1


def test_a_lock_file_left_by_a_killed_run_does_not_block(site: Path) -> None:
    (site / "store").mkdir()
    (site / "store" / LOCK_FILE).write_text("")  # the file stays when its holder is killed; its flock does not
    assert run_site(site, []).rois == 1
    assert not (site / "store" / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------
# more: the annotation CSV as spreadsheets write it, and paths that lead out of --dicom-dir


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
def test_excel_csv_with_bom_crlf_and_its_separators_is_read(site: Path, delimiter: str) -> None:
    rows = [COLUMNS, good_row("good.dcm"), good_row("good.dcm", "emphysema", (40, 40, 50, 50))]
    text = "\r\n".join(delimiter.join(map(str, row)) for row in rows) + "\r\n"
    (site / "annotations.csv").write_bytes(text.encode("utf-8-sig"))
    report = prepare.prepare_site(site / "dicom", site / "annotations.csv", site / "store", secret_path=site / "key", workers=1)
    assert (report.rois, report.rejects) == (2, [])


@pytest.mark.parametrize(
    ("encoding", "says"), [("cp1252", "is not UTF-8 text (byte 0xdc on line 3)"), ("utf-16", "is UTF-16 text")]
)
def test_csv_in_another_encoding_is_a_one_line_error_naming_the_fix(site: Path, encoding: str, says: str, capsys) -> None:
    rows = [COLUMNS, good_row("good.dcm"), ["dicom/good.dcm", "MÜLLER-1", 40, 40, 50, 50, "nodule"]]
    (site / "annotations.csv").write_bytes("\n".join(",".join(map(str, r)) for r in rows).encode(encoding))
    assert cli(site) == 2
    _, err = summary_and_error(capsys)
    assert says in err and "UTF-8" in err and err.count("\n") == 1
    assert not (site / "store").exists()


def test_csv_paths_leading_out_of_the_dicom_folder_are_rejected_unread(site: Path, monkeypatch) -> None:
    write_dicom(site / "private" / "other-study.dcm")
    calls = count_decodes(monkeypatch)
    report = run_site(site, [good_row("../private/other-study.dcm"),
                             [str(site / "private" / "other-study.dcm"), "CSV-1", 10, 10, 40, 40, "nodule"],
                             ["../../private/other-study.dcm", "CSV-1", 10, 10, 40, 40, "nodule"]])
    assert [(reason, row) for reason, _, row in rejected(report)] == [
        ("outside-dicom-dir", 3), ("outside-dicom-dir", 4), ("outside-dicom-dir", 5)]
    assert report.rois == 1 and dict(calls) == {"good.dcm": 1}
