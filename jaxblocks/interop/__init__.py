"""Weight import from other frameworks' model zoos. Public re-exports only."""

from jaxblocks.interop.timm import TIMM_FAMILIES as TIMM_FAMILIES
from jaxblocks.interop.timm import TimmFamily as TimmFamily
from jaxblocks.interop.timm import convert as convert
from jaxblocks.interop.timm import load as load
from jaxblocks.interop.timm import load_timm_state_dict as load_timm_state_dict
from jaxblocks.interop.timm import read_state_dict as read_state_dict
from jaxblocks.interop.timm import timm_key as timm_key
