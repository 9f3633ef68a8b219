"""Model families: one subpackage each, holding the adapter and a reference implementation."""
