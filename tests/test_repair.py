"""repair index and repair snapshots through the real CLI."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from kyrorepo.repository import Repository
from test_verify import Env, _env, env, flip, locate, packs, restored_equal, run, run_json, template  # noqa: F401

pytestmark = pytest.mark.usefixtures("_env")


def _snapshot_names(env: Env) -> list[str]:
    return sorted(os.listdir(os.path.join(env.repo, "snapshots")))


def test_repair_snapshots_needs_dry_run_or_yes(env: Env) -> None:
    rc, _, err = run("repair", "snapshots", *env.opts())
    assert rc == 2 and "--dry-run" in err and "--yes" in err
    assert run("repair", "snapshots", *env.opts(), "--dry-run", "--yes")[0] == 2


def test_repair_snapshots_drops_damaged_file_and_keeps_the_rest(env: Env) -> None:
    first, latest = env.backups()
    pack, offset = locate(env, latest, "big/b.bin")
    flip(pack, offset)
    before = _snapshot_names(env)

    rc, plan, err = run_json("repair", "snapshots", *env.opts(), "--dry-run")
    assert rc == 0, err
    assert plan["dry_run"] and {b["old_id"] for b in plan["backups"]} == {first, latest}
    assert all(len(b["lost"]) == 1 and b["lost"][0].startswith("big/b.bin: ") for b in plan["backups"])
    assert _snapshot_names(env) == before  # a dry run changes nothing

    rc, out, err = run("repair", "snapshots", *env.opts(), "--yes")
    assert rc == 0, err
    assert "rewrote backup" in out and "big/b.bin" in out
    listed = json.loads(run("list", *env.opts(), "--json")[1])
    assert len(listed) == 2 and not set(_snapshot_names(env)) & set(before)
    assert all(len(b["lost"]) == 1 and "big/b.bin" in b["lost"][0] for b in listed)

    new_first, new_latest = env.backups()
    restored_equal(env, new_first, env.v1, skip=("big/b.bin",))
    restored_equal(env, new_latest, env.v2, skip=("big/b.bin",))
    rc, rep, err = run_json("verify", *env.opts(), "--full-scan")
    assert rc == 0, err  # the damaged pack is known and its damaged blob no longer indexed
    assert any("no longer indexed" in n for n in rep["notices"])


def test_next_backup_stores_dropped_data_again(env: Env) -> None:
    latest = env.backups()[-1]
    pack, offset = locate(env, latest, "a.bin")
    flip(pack, offset)
    assert run("repair", "snapshots", *env.opts(), "--yes")[0] == 0
    rc, _, err = run("backup", *env.opts(), "--data-dir", env.v2, "--source", "db", "--full")
    assert rc == 0, err
    newest = env.backups()[-1]
    restored_equal(env, newest, env.v2)  # a.bin did not dedupe against the damaged chunk
    assert run("verify", *env.opts(), "--full-scan")[0] == 0


def test_repair_snapshots_after_missing_pack_structure_only(env: Env) -> None:
    first, latest = env.backups()
    pack, _ = locate(env, latest, "f.bin")
    os.remove(pack)
    rc, rep, err = run_json("repair", "snapshots", *env.opts(), "--yes", "--structure-only")
    assert rc == 0, err
    fixes = {b["old_id"]: b for b in rep["backups"]}
    assert any(line.split(": ")[0] in ("f.bin", "/") for line in fixes[latest]["lost"])
    assert run("verify", *env.opts(), "--full-scan")[0] == 0
    for old, source in ((first, env.v1), (latest, env.v2)):
        fix = fixes.get(old)
        lost = tuple(line.split(": ")[0] for line in fix["lost"]) if fix else ()
        restored_equal(env, fix["new_id"] if fix else old, source, skip=lost)


def test_repair_snapshots_drops_unreadable_directory(env: Env) -> None:
    latest = env.backups()[-1]
    pack, offset = locate(env, latest, "sub", tree=True)
    flip(pack, offset)
    rc, rep, err = run_json("repair", "snapshots", *env.opts(), "--yes")
    assert rc == 0, err
    assert any(line.startswith("sub/: ") for b in rep["backups"] for line in b["lost"])
    for backup, source in zip(env.backups(), (env.v1, env.v2)):
        restored_equal(env, backup, source, skip=("sub/",))
    assert run("verify", *env.opts(), "--full-scan")[0] == 0


def test_repair_snapshots_refuses_while_the_index_is_damaged(env: Env) -> None:
    seg = glob.glob(os.path.join(env.repo, "index", "*"))[0]
    flip(seg, 50)
    before = _snapshot_names(env)
    rc, _, err = run("repair", "snapshots", *env.opts(), "--yes")
    assert rc == 15 and "repair index" in err
    assert _snapshot_names(env) == before
    assert run("repair", "index", *env.opts())[0] == 0
    assert run("verify", *env.opts(), "--full-scan")[0] == 0


def test_repair_index_after_losing_index_and_cache(env: Env) -> None:
    shutil.rmtree(os.path.join(env.repo, "index"))
    shutil.rmtree(env.cache)
    rc, rep, err = run_json("verify", *env.opts())
    assert rc == 13 and "repair index" in err
    assert rep["unindexed_packs"] == len(packs(env))
    rc, res, err = run_json("repair", "index", *env.opts())
    assert rc == 0, err
    assert res["packs"] == len(packs(env)) and res["unreadable"] == []
    first, latest = env.backups()
    restored_equal(env, first, env.v1)
    restored_equal(env, latest, env.v2)
    assert run("verify", *env.opts(), "--full-scan")[0] == 0


def test_repair_index_killed_before_removing_old_segments(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    old = set(os.listdir(os.path.join(env.repo, "index")))

    def killed(self, btype, name):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Repository, "remove_object", killed)
        assert run("repair", "index", *env.opts())[0] == 130
    now = set(os.listdir(os.path.join(env.repo, "index")))
    assert old < now  # new segments written, old ones still there: every pack listed twice
    assert run("verify", *env.opts(), "--full-scan", "--restore-test")[0] == 0
    assert run("repair", "index", *env.opts())[0] == 0  # safe to run again
    assert not old & set(os.listdir(os.path.join(env.repo, "index")))
    restored_equal(env, env.backups()[-1], env.v2)


def test_repair_index_keeps_pack_with_damaged_trailer(env: Env) -> None:
    pack = packs(env)[0]
    flip(pack, os.path.getsize(pack) - 60)
    rc, res, err = run_json("repair", "index", *env.opts())
    assert rc == 0, err
    assert res["carried_over"] and os.path.basename(pack) in res["carried_over"][0]
    first, latest = env.backups()
    restored_equal(env, latest, env.v2)  # its blobs are still indexed and intact
    rc, _, err = run("verify", *env.opts())
    assert rc == 13 and "trailer" in err  # the damage itself stays reported
