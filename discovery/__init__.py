"""Node registration and membership through etcd leases; a static discovery for tests."""
