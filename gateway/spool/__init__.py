"""The durable encrypted spool: records and their states, the index, the files."""
