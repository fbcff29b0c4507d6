"""Everything that touches Ray: the Ray Data slice pipeline, the Ray Train loop and the Tune driver."""
