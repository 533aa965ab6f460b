"""Several passphrases open one repository: key list / add / remove / passwd."""

from __future__ import annotations

import json


def test_key_lifecycle(repo_cli, tmp_path):
    new = tmp_path / "new-pass"
    new.write_text("second passphrase\n")
    repo_cli.run("key", "add", "--new-password-file", str(new), "--kdf-memory-kib", "1024", "--kdf-iterations", "1")
    keys = json.loads(repo_cli.run("key", "list", "--json").stdout)
    assert len(keys) == 2 and {k["memory_kib"] for k in keys} == {1024}
    repo_cli.run("list", env={"KYROREPO_PASSWORD": "second passphrase"})
    repo_cli.run("list")  # the first still opens
    # passwd: the old passphrase stops working, the new one works
    third = tmp_path / "third"
    third.write_text("third passphrase")
    repo_cli.run("key", "passwd", "--new-password-file", str(third), "--kdf-memory-kib", "1024",
                 "--kdf-iterations", "1")
    repo_cli.run("list", expect=12)
    repo_cli.run("list", env={"KYROREPO_PASSWORD": "third passphrase"})
    keys = json.loads(repo_cli.run("key", "list", "--json", env={"KYROREPO_PASSWORD": "third passphrase"}).stdout)
    assert len(keys) == 2
    # never the last key: remove one, then the one left is refused
    repo_cli.run("key", "remove", keys[0]["id"][:12], env={"KYROREPO_PASSWORD": "third passphrase"})
    left = [p for p in ("second passphrase", "third passphrase")
            if repo_cli.run("list", env={"KYROREPO_PASSWORD": p}, expect=None).returncode == 0]
    assert len(left) == 1
    r = repo_cli.run("key", "remove", keys[1]["id"][:12], env={"KYROREPO_PASSWORD": left[0]}, expect=2)
    assert "last key" in r.stderr


def test_password_file_and_command(repo_cli, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("test-pass\n")
    repo_cli.env.pop("KYROREPO_PASSWORD")
    repo_cli.run("list", "--password-file", str(pw))
    repo_cli.run("list", "--password-command", f"cat {pw}")
    repo_cli.run("list", env={"KYROREPO_PASSWORD_FILE": str(pw)})
    r = repo_cli.run("list", expect=2)  # no terminal to prompt on
    assert "KYROREPO_PASSWORD" in r.stderr and r.stderr.count("\n") == 1
