"""The core library: every piece of ML logic, shared by all commands."""
