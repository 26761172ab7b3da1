"""sorna_agent"""
