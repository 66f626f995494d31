import numpy as np

from geoloc.countries import default_country_lookup


def test_known_points_and_sea():
    lookup = default_country_lookup()
    pts = np.array([[48.8566, 2.3522], [40.7128, -74.0060], [35.6762, 139.6503], [-33.8688, 151.2093],
                    [64.1466, -21.9426], [0.0, -30.0], [-60.0, 170.0]])
    assert lookup(pts).tolist() == ["FRA", "USA", "JPN", "AUS", "ISL", "", ""]
