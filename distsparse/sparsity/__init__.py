"""Pure mask mathematics: masks, layer allocation, scores, exact selection, schedules."""
