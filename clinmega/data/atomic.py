"""Moved to :mod:`clinmega.utils.atomic` (one home for every stage); kept so old imports work."""

from clinmega.utils.atomic import (  # noqa: F401
    publish_dir,
    shared_tmp_dir,
    staging_dir,
    tmp_name,
    tmp_sibling,
    write_json_atomic,
    write_text_atomic,
)
