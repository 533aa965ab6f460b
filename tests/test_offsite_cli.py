"""Every command on every backend: the real CLI against a real sshd and a real S3 endpoint."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from conftest import Cli
from servers import DUMMY_KEY_ID, DUMMY_SECRET, REGION, free_port, moto_server, sshd_server  # noqa: F401
from treeutil import make_rich_tree, snapshot_tree

pytestmark = pytest.mark.network
MARKER = b"OFFSITE-PLAINTEXT-MARKER-3c9e"


def aws_env(tmp_path, endpoint):
    return {"AWS_ACCESS_KEY_ID": DUMMY_KEY_ID, "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET, "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": str(tmp_path / "none"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3_cli(tmp_path, moto_server):  # noqa: F811
    cli = Cli(f"s3://{moto_server.bucket}/{uuid.uuid4().hex}", str(tmp_path / "cache"))
    cli.env.update(aws_env(tmp_path, moto_server.endpoint))
    return cli


@pytest.fixture
def sftp_cli(tmp_path, sshd_server):  # noqa: F811
    cli = Cli(sshd_server.url(os.path.join(sshd_server.root, uuid.uuid4().hex)), str(tmp_path / "cache"))
    cli.env.update({"KYROREPO_SFTP_KEY": sshd_server.user_key, "KYROREPO_SSH_KNOWN_HOSTS": sshd_server.known_hosts,
                    "HOME": str(tmp_path)})
    cli.env.pop("SSH_AUTH_SOCK", None)
    return cli


def full_cycle(cli, tmp_path):
    data = tmp_path / "data"
    make_rich_tree(str(data))
    (data / "marker.txt").write_bytes(MARKER * 50)
    cli.init("--pack-size", "1M")
    first = json.loads(cli.run("backup", "--data-dir", str(data), "--json").stdout)
    (data / "more.bin").write_bytes(os.urandom(300_000))
    second = json.loads(cli.run("backup", "--data-dir", str(data), "--json").stdout)
    assert second["files_unmodified"] == first["file_count"]
    listed = json.loads(cli.run("list", "--json").stdout)
    assert [x["id"] for x in listed] == [second["id"], first["id"]]
    cli.run("restore", "--backup-id", "latest", "--data-dir", str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out")) == snapshot_tree(str(data))
    if "verify" in cli.run("--help", repo=False).stdout:
        cli.run("verify", "--full-scan")
    return second


def test_every_command_over_sftp(sftp_cli, tmp_path, sshd_server):  # noqa: F811
    full_cycle(sftp_cli, tmp_path)
    stored = sftp_cli.repo.split(str(sshd_server.port), 1)[1]
    for d, _, fs in os.walk(stored):  # the server is this machine: look at what it stored
        for f in fs:
            assert MARKER not in open(os.path.join(d, f), "rb").read()


def test_every_command_over_s3_and_no_plaintext(s3_cli, tmp_path, moto_server):  # noqa: F811
    full_cycle(s3_cli, tmp_path)
    client = moto_server.client()
    prefix = s3_cli.repo.split("/", 3)[3]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=moto_server.bucket, Prefix=prefix)["Contents"]]
    assert any("/data/" in k for k in keys) and any("/snapshots/" in k for k in keys)
    for k in keys:
        body = client.get_object(Bucket=moto_server.bucket, Key=k)["Body"].read()
        assert MARKER not in body and b"marker.txt" not in body


def test_seed_s3_forms_roundtrip(repo_cli, tmp_path, moto_server):  # noqa: F811
    repo_cli.env.update(aws_env(tmp_path, moto_server.endpoint))
    data = tmp_path / "data"
    make_rich_tree(str(data))
    b = json.loads(repo_cli.run("backup", "--data-dir", str(data), "--json").stdout)
    prefix = f"production-{uuid.uuid4().hex[:8]}/"
    up = json.loads(repo_cli.run("upload-s3", "--backup-id", b["short_id"], "--bucket", moto_server.bucket,
                                 "--prefix", prefix, "--json", "--kdf-memory-kib", "1024",
                                 "--kdf-iterations", "1").stdout)
    assert up["created"] and up["copied"] == [b["id"]]
    out_repo = tmp_path / "restore-repo"
    down = json.loads(repo_cli.run("download-s3", "--backup-id", b["id"], "--bucket", moto_server.bucket,
                                   "--prefix", prefix, "--output-dir", str(out_repo), "--json",
                                   "--kdf-memory-kib", "1024", "--kdf-iterations", "1").stdout)
    assert down["copied"] == [b["id"]]
    local = Cli(str(out_repo), repo_cli.cache)
    local.run("restore", "--backup-id", b["id"], "--data-dir", str(tmp_path / "out"))
    assert snapshot_tree(str(tmp_path / "out")) == snapshot_tree(str(data))
    # sync-s3 with --delete-after-upload forgets local backups only after checking them in S3
    (data / "new").write_text("new")
    repo_cli.run("backup", "--data-dir", str(data))
    sync = json.loads(repo_cli.run("sync-s3", "--backup-dir", repo_cli.repo, "--bucket", moto_server.bucket,
                                   "--prefix", prefix, "--delete-after-upload", "--json", repo=False).stdout)
    assert len(sync["forgotten"]) == 2 and len(sync["already_present"]) == 1
    assert json.loads(repo_cli.run("list", "--json").stdout) == []
    s3 = Cli(f"s3://{moto_server.bucket}/{prefix}", repo_cli.cache)
    s3.env.update(repo_cli.env)
    assert len(json.loads(s3.run("list", "--json").stdout)) == 2


def test_clear_errors(tmp_path, s3_cli, sftp_cli, sshd_server):  # noqa: F811
    # wrong endpoint
    bad = Cli("s3://bucket/x", str(tmp_path / "c"))
    bad.env.update(aws_env(tmp_path, f"http://127.0.0.1:{free_port()}"))
    r = bad.run("list", expect=None)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "127.0.0.1" in r.stderr
    # missing credentials
    nocred = Cli(s3_cli.repo, str(tmp_path / "c"))
    nocred.env.update(aws_env(tmp_path, s3_cli.env["AWS_ENDPOINT_URL"]))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        nocred.env.pop(k)
    r = nocred.run("list", expect=None)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "credential" in r.stderr.lower()
    # unknown host key
    empty_known = tmp_path / "known_hosts"
    empty_known.write_text("")
    r = sftp_cli.run("list", expect=None, env={"KYROREPO_SSH_KNOWN_HOSTS": str(empty_known)})
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "host key" in r.stderr.lower()
