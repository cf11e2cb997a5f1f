"""The typed, validated configs of the three jobs and the machinery they share.
"""

from densepure_core.config.certify import *  # noqa: F401,F403
from densepure_core.config.certify import (_JobConfig, _no_credentials, _Strict, _stream_version,  # noqa: F401
                                           _vote_dump)
