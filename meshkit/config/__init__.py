"""The policy document: load, validate, match rules to methods, compile.

The code lives in :mod:`meshkit.config.policy`; this package re-exports its names so
``meshkit.config`` stays the import path.
"""

from meshkit.config.policy import (
    DEFAULT_DEADLINE_MARGIN as DEFAULT_DEADLINE_MARGIN,
)
from meshkit.config.policy import (
    MAX_COMPILED_METHODS as MAX_COMPILED_METHODS,
)
from meshkit.config.policy import (
    MAX_INSTANCES as MAX_INSTANCES,
)
from meshkit.config.policy import (
    SECTIONS as SECTIONS,
)
from meshkit.config.policy import (
    MethodPolicy,
    Policy,
    located,
    parse_duration,
    parse_size,
    read_bool,
    read_code,
    read_codes,
    read_int,
    read_mapping,
    read_number,
    read_str,
    read_yaml,
    show_value,
)
from meshkit.config.policy import (
    Rule as Rule,
)
from meshkit.config.policy import (
    _bare as _bare,
)

__all__ = [
    "MethodPolicy",
    "Policy",
    "located",
    "parse_duration",
    "parse_size",
    "read_bool",
    "read_code",
    "read_codes",
    "read_int",
    "read_mapping",
    "read_number",
    "read_str",
    "read_yaml",
    "show_value",
]
