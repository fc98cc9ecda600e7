"""Serving: packed integer export, one-artifact loading, Mix'n'Match."""

from keras_matquant.packing import PackedCodes
from keras_matquant.packing import pack_codes
from keras_matquant.packing import unpack_codes
from keras_matquant.serving.divergence import PlanDivergence
from keras_matquant.serving.divergence import PlanScore
from keras_matquant.serving.export import export
from keras_matquant.serving.export import load
from keras_matquant.serving.export import saved_precisions
from keras_matquant.serving.export import stored_precisions
from keras_matquant.serving.generation import generate
from keras_matquant.serving.knapsack import Allocation
from keras_matquant.serving.knapsack import solve_knapsack
from keras_matquant.serving.mix_n_match import LAYER_ORDERS
from keras_matquant.serving.mix_n_match import UnitCosts
from keras_matquant.serving.mix_n_match import order_plan
from keras_matquant.serving.mix_n_match import order_ranking
from keras_matquant.serving.mix_n_match import plan_units
from keras_matquant.serving.mix_n_match import unit_costs
from keras_matquant.serving.plan_search import PlanSearchResult
from keras_matquant.serving.plan_search import Sensitivities
from keras_matquant.serving.plan_search import measure_sensitivities
from keras_matquant.serving.plan_search import search_plan
