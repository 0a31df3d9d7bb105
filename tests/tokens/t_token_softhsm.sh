#!/bin/bash
# t_token_softhsm: every check of tests/tokens/checks.sh on SoftHSM2 (tests/tokens/setup-softhsm.sh).
exec bash "$(dirname "$0")/run.sh" softhsm
