"""Built-in stages; `compress.registry.BUILTIN_STAGES` lists the modules that register them."""
