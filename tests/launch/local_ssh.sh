#!/bin/sh
# A stand-in for ssh in the --hostfile tests: `local_ssh.sh HOST COMMAND...` runs COMMAND on this machine, as
# `ssh HOST COMMAND...` runs it on HOST (ssh joins its arguments with spaces for the remote shell), and appends
# HOST to $SHARDLM_TEST_SSH_LOG when that is set.
host=$1
shift
if [ -n "$SHARDLM_TEST_SSH_LOG" ]; then echo "$host" >> "$SHARDLM_TEST_SSH_LOG"; fi
exec sh -c "$*"
