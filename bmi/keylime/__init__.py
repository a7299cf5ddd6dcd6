"""Fleet attestation with Keylime: PD launches in an IMA-style list, a pull-mode agent, runtime policies."""
