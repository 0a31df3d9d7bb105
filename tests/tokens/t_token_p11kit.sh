#!/bin/bash
# t_token_p11kit: every check of tests/tokens/checks.sh on a token reached through p11-kit server and p11-kit-client.so (tests/tokens/setup-p11kit.sh).
exec bash "$(dirname "$0")/run.sh" p11kit
