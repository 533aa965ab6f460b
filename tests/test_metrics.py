"""Prometheus metrics: stats --prometheus / --json and the node_exporter textfile."""

from __future__ import annotations

import json

from kyrorepo.metrics import Metrics


def test_metrics_parse_render_roundtrip():
    m = Metrics()
    m.inc("backup_total", source='host:/data "x"')
    m.inc("backup_total", source='host:/data "x"')
    m.set("restore_bytes", 12.5)
    again = Metrics.parse(m.render())
    assert again.values == m.values
    assert "# TYPE kyrorepo_backup_total counter" in m.render()


def test_stats_and_textfile(repo_cli, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"x" * 5000)
    repo_cli.run("backup", "--data-dir", str(data), "--source", "db1")
    repo_cli.run("backup", "--data-dir", str(data), "--source", "db1")
    prom = repo_cli.run("stats", "--prometheus").stdout
    assert 'kyrorepo_backup_total{source="db1"} 2' in prom
    assert 'kyrorepo_backup_size_bytes{source="db1"} 5000' in prom
    assert "kyrorepo_repository_packs 1" in prom
    st = json.loads(repo_cli.run("stats", "--json").stdout)
    assert st["backups"] == 2 and st["sources"][0]["source"] == "db1" and st["sources"][0]["latest_files"] == 1
    textfile = tmp_path / "kyrorepo.prom"
    repo_cli.run("backup", "--data-dir", str(data), "--source", "db1", "--metrics-file", str(textfile))
    assert 'kyrorepo_backup_total{source="db1"} 1' in textfile.read_text()
    for i in range(2):
        repo_cli.run("restore", "--backup-id", "latest", "--data-dir", str(tmp_path / f"out{i}"),
                     "--metrics-file", str(textfile))
    text = textfile.read_text()
    assert "kyrorepo_restore_total 2" in text and "kyrorepo_restore_bytes 5000" in text
