"""Former private name of :mod:`mtlbench.tasks.helpers` (kept so that older imports keep working): the same module
object, private names included."""
import sys

from mtlbench.tasks import helpers as _helpers

sys.modules[__name__] = _helpers
