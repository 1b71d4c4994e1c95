"""Analysis mixins composed by :class:`BBDecoder.Master_analyzer`."""
