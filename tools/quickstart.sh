#!/usr/bin/env bash
# The main job, end to end: install kyrorepo, make a sample KyroDB data directory,
# back it up into a local encrypted repository, change it, back it up again, list the
# backups, restore the latest one and compare it with the original.
# Everything lives in ./demo; run it again to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
K=.venv/bin/kyrorepo
PY=.venv/bin/python

rm -rf demo && mkdir -p demo
head -c 24 /dev/urandom | base64 > demo/passphrase
export KYROREPO_REPO="$PWD/demo/repo" KYROREPO_PASSWORD_FILE="$PWD/demo/passphrase"
export KYROREPO_CACHE_DIR="$PWD/demo/cache"

echo "== sample KyroDB data directory (MANIFEST, snapshot, WAL segments)"
NOW=$(date +%s)
$PY tools/make_kyrodb.py create demo/data --frames 20000 --dim 128 --frames-per-segment 5000 \
    --start $((NOW - 100)) --seconds-per-frame 0.004 >/dev/null
du -sh demo/data

echo "== init"
$K init
echo "== first backup"
$K backup --data-dir demo/data --description "quickstart first backup"

echo "== the database keeps writing; wal-archive captures the new WAL frames"
sleep 1
T1=$(date +%s)
$PY tools/make_kyrodb.py append demo/data --frames 3000 --start "$T1" --seconds-per-frame 0.001 >/dev/null
sleep 4
$K wal-archive --data-dir demo/data --once
echo "== second backup: stores only what changed"
$K backup --data-dir demo/data --description "quickstart second backup"
echo "== list"
$K list
$K pitr-window

echo "== restore the latest backup into demo/restored"
$K restore --backup-id latest --data-dir demo/restored
diff -r demo/data demo/restored && echo "OK: demo/restored is identical to demo/data"

echo "== point-in-time recovery: the database as it was at second $((T1 + 1))"
$K restore-pitr --timestamp $((T1 + 1)) --data-dir demo/pitr --dry-run
$K restore-pitr --timestamp $((T1 + 1)) --data-dir demo/pitr
$PY tools/make_kyrodb.py info demo/pitr | $PY -c 'import json, sys
s = json.load(sys.stdin)["segments"]
print("restored WAL: %d frames, the newest written at %d" % (sum(x["frames"] for x in s), max(x["time"][1] for x in s if x["frames"])))'

echo "== verify the repository"
if $K verify --help >/dev/null 2>&1; then $K verify --full-scan; fi
echo
echo "Try next: export KYROREPO_REPO=$KYROREPO_REPO KYROREPO_PASSWORD_FILE=$KYROREPO_PASSWORD_FILE KYROREPO_CACHE_DIR=$KYROREPO_CACHE_DIR"
echo "          .venv/bin/kyrorepo list --json; .venv/bin/kyrorepo --help"
