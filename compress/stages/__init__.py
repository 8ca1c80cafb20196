"""Built-in stages, one module each (a config class + one registered `apply`); `catalog` imports them all."""
