#!/bin/bash
# t_token_opensc: every check of tests/tokens/checks.sh on OpenSC with a virtual CAC card behind a private pcscd (tests/tokens/setup-opensc.sh).
exec bash "$(dirname "$0")/run.sh" opensc
