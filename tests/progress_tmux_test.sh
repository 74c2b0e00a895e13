#!/usr/bin/env bash
# The progress bar on a real terminal: tmux runs progress_demo in a 60-column
# pane; capture-pane must show the bar while it runs, no line wider than the
# pane, and the shell prompt at the start of its own line afterwards, also
# after Ctrl-C.
#   progress_tmux_test.sh PROGRESS_DEMO
set -euo pipefail
demo=$1
command -v tmux >/dev/null || { echo "tmux is not installed (sh tools/install-deps.sh)" >&2; exit 1; }
session=procpool-progress-$$
export TMUX_TMPDIR=$(mktemp -d)
trap 'tmux kill-server 2>/dev/null || true; rm -rf "$TMUX_TMPDIR"' EXIT
tmux new-session -d -s "$session" -x 60 -y 15 "env -i PATH=/usr/bin:/bin TERM=xterm-256color LANG=C.UTF-8 PS1='PROMPT> ' bash --norc --noprofile -i"
sleep 0.3
failures=0
check() { if ! eval "$2"; then echo "FAIL: $1" >&2; failures=$((failures + 1)); fi; }
pane() { tmux capture-pane -p -t "$session"; }

# 1. A full run: the bar while running, a clean prompt after.
tmux send-keys -t "$session" "$demo 150 20" Enter
sleep 1.0
during=$(pane)
echo "--- during the run:"; echo "$during"
check "a bar with percent and rate is shown" 'grep -qE "[0-9]+%\|.*\| [0-9]+/150 \[.*it/s\]" <<<"$during"'
sleep 2.5
after=$(pane)
echo "--- after the run:"; echo "$after"
check "a final line at 100%" 'grep -q "100%|.*150/150" <<<"$after"'
check "the program's own output starts its own line" 'grep -q "^ran 150 tasks" <<<"$after"'
check "the prompt is back at the start of a line" '[ "$(grep -c "^PROMPT>" <<<"$after")" -ge 2 ]'
widest=0  # in characters: the bar is drawn with multi-byte block characters
while IFS= read -r line; do
  n=$(LC_ALL=C.UTF-8 bash -c 'printf %s "${#1}"' _ "$line")
  [ "$n" -gt "$widest" ] && widest=$n
done <<<"$after"
check "no line wider than the pane ($widest)" '[ "$widest" -le 60 ]'

# 2. Ctrl-C in mid-run: the line is ended, the prompt starts clean.
tmux send-keys -t "$session" "clear" Enter
sleep 0.3
tmux send-keys -t "$session" "$demo 1000 20" Enter
sleep 1.0
tmux send-keys -t "$session" C-c
sleep 0.5
interrupted=$(pane)
echo "--- after Ctrl-C:"; echo "$interrupted"
check "the bar was drawn before Ctrl-C" 'grep -q "/1000" <<<"$interrupted"'
check "the prompt after Ctrl-C starts its own line" '[ "$(tail -n +2 <<<"$interrupted" | grep -c "^PROMPT>")" -ge 1 ]'
check "no worker survived Ctrl-C" '! pgrep -f "$demo 1000 20" >/dev/null'
exit $failures
