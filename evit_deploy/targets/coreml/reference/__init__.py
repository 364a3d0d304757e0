"""A numpy reference executor of saved ML programs: what verifies Core ML packages where
Apple's Core ML runtime does not exist (everywhere but macOS), and what measures their
fp16 drift and int8 activation ranges everywhere.

* :mod:`.executor`: the ``main`` function of a saved package, run op by op (:class:`Program`);
* :mod:`.ops`: one numpy function per ML program operation;
* :mod:`.values`: MIL types and values (immediate or in the weight file) as numpy;
* :mod:`.blob`: the weight file's format.
"""

from __future__ import annotations

from .executor import Program, ProgramError, UnsupportedOpError, check_supported

__all__ = ["Program", "ProgramError", "UnsupportedOpError", "check_supported"]
