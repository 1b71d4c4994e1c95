"""Everything that reaches the disk: the layout table, the record schema, the store, video files."""
