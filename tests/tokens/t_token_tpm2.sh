#!/bin/bash
# t_token_tpm2: every check of tests/tokens/checks.sh on tpm2-pkcs11 on swtpm behind tpm2-abrmd (tests/tokens/setup-tpm2.sh).
exec bash "$(dirname "$0")/run.sh" tpm2
