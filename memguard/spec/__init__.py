"""What is about to be trained, as memguard reads it: ``memguard check``'s config files (config.py is the
entry point: load_config -> CheckSpec) and the vocabularies they are checked against.

Nothing here is imported by this ``__init__``: each module is imported where it is used, so reading a
precision name does not load the config machinery.
"""
