#!/bin/bash
# t_token_nss: every check of tests/tokens/checks.sh on NSS softokn (tests/tokens/setup-nss.sh).
exec bash "$(dirname "$0")/run.sh" nss
