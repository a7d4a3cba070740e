"""The analytic link model: transfer time = RTT + bytes / rate, for offline estimates.

Used by the testbed when no emulated link can be set up (not root, or no
iproute2): the modelled transfer time is added to the loopback round trip;
and by the energy model, for the radio's active time.
"""

from __future__ import annotations

from dataclasses import dataclass

from askexpert.measure.profiles import LinkPreset


@dataclass(frozen=True)
class LinkModel:
    preset: LinkPreset

    def uplink_s(self, nbytes: float) -> float:
        return nbytes * 8 / (self.preset.up_mbps * 1e6)

    def downlink_s(self, nbytes: float) -> float:
        return nbytes * 8 / (self.preset.down_mbps * 1e6)

    def round_trip_s(self, up_bytes: float, down_bytes: float) -> float:
        """Expected time from the first request byte sent to the last reply byte received.

        Loss is charged as the expected number of retransmissions times one RTT.
        """
        base = self.preset.rtt_ms / 1e3 + self.uplink_s(up_bytes) + self.downlink_s(down_bytes)
        return base + self.preset.loss / (1 - self.preset.loss) * self.preset.rtt_ms / 1e3
