"""Remote hosts: linux+ssh:// and xen+ssh:// over the system's OpenSSH client."""
