"""Test support: deterministic OCI images (oci), a real registry process (registry), and the
pytest fixtures built on them (plugin: `registry`, `test_images`, `auth_registry`)."""
