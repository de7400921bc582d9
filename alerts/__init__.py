"""milepost.alerts: rules, alert state, routes, receivers and a persisted outbox.

Imports only the contract, the standard library, pydantic and httpx (import-linter).
The daemon holds an `AlertManager` (manager.py) and an `Outbox` + `Dispatcher`
(outbox.py, made by `open_delivery`); `send_test` backs `milepost alerts test`.
"""

from milepost.alerts.manager import AlertManager, open_delivery, send_test
from milepost.alerts.model import Alert, AlertStatus, Condition, Matcher, Notification, Silence
from milepost.alerts.outbox import Dispatcher, Outbox
from milepost.alerts.receivers import Outcome, Receiver, build_receiver
from milepost.engine.contract.config.alerts import AlertsConfig, ReceiverConfig, RouteConfig, RulesConfig

__all__ = [
    "Alert",
    "AlertManager",
    "AlertStatus",
    "AlertsConfig",
    "Condition",
    "Dispatcher",
    "Matcher",
    "Notification",
    "Outbox",
    "Outcome",
    "ReceiverConfig",
    "Receiver",
    "RouteConfig",
    "RulesConfig",
    "Silence",
    "build_receiver",
    "open_delivery",
    "send_test",
]
